"""The digit finder on single frames: real MNIST test digits written on synthetic paper, no camera or model.

Each frame is built here so the truth is exact: where each digit was written, in which polarity, under
which light. The video test (test_sample_video.py) covers the same code on a real decoded video.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from agent.errors import SourceError
from agent.inference.tasks.digit_finder import DigitFinder, FoundDigits, normalise_digit
from agent.settings import DigitFinderSettings

MNIST = Path(__file__).resolve().parents[1] / "models" / "mnist" / "data" / "mnist.npz"
PAPER, INK = 215.0, 45.0


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MNIST) as data:
        return data["x_test"], data["y_test"]


def write(frame: np.ndarray, digit: np.ndarray, x: int, y: int, height: int, ink: float = INK) -> list[int]:
    """Write one 28x28 MNIST digit as ink into a float grey frame; returns its ink box [x, y, w, h]."""
    size = round(28 * height / 20)
    alpha = np.clip(cv2.resize(digit.astype(np.float32) / 255, (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    region = frame[y : y + size, x : x + size]
    region[:] = region * (1 - alpha) + ink * alpha
    ys, xs = np.nonzero(alpha >= 0.5)
    return [x + int(xs.min()), y + int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def paper(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """Blank paper with a little sensor noise, as float grey."""
    rng = np.random.default_rng(seed)
    return PAPER + rng.normal(0, 2.5, (height, width)).astype(np.float32)


def to_bgr(grey: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.clip(grey, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)


def iou(a, b) -> float:
    """Intersection over union of two [x, y, w, h] boxes (also used by test_sample_video)."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def three_digits(mnist, frame: np.ndarray) -> tuple[list[list[int]], list[int]]:
    """Digits 0, 1 and 2 of the MNIST test set, at three sizes, spread over the frame."""
    images, labels = mnist
    boxes = [write(frame, images[i], x, y, h) for i, (x, y, h) in enumerate([(60, 60, 50), (300, 150, 110), (500, 330, 70)])]
    return boxes, [int(labels[i]) for i in range(3)]


def assert_found(found: FoundDigits, boxes: list[list[int]]) -> None:
    assert len(found) == len(boxes), found.boxes
    for box in boxes:
        assert max(iou(box, b) for b in found.boxes) >= 0.7, (box, found.boxes)


def test_normalise_is_identity_on_all_mnist_test_images(mnist):
    """MNIST itself is already in the form normalise_digit makes, so it must come back unchanged: the
    proof that crops are prepared exactly like the data the model was trained on."""
    images, _ = mnist
    changed = [i for i, image in enumerate(images) if np.abs(normalise_digit(image) - image / 255.0).max() > 1e-5]
    # Three MNIST digits are 19 px tall after MNIST's own anti-aliasing; they come back scaled to 20.
    assert len(changed) <= 3, changed


def test_normalise_fits_20x20_keeps_aspect_and_centres_the_mass():
    crop = np.zeros((90, 40), np.uint8)
    crop[10:70, 5:35] = 255  # a 60x30 bar, off-centre in its crop
    crop[60:70, 5:35] = 128  # heavier on top: the centre of mass is not the box centre
    out = normalise_digit(crop)
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    rows, cols = np.flatnonzero(out.max(axis=1) > 0), np.flatnonzero(out.max(axis=0) > 0)
    assert len(rows) == 20 and len(cols) == 10
    ys, xs = np.mgrid[0:28, 0:28]
    assert abs((out * ys).sum() / out.sum() - 14.0) <= 0.5
    assert abs((out * xs).sum() / out.sum() - 14.0) <= 0.5


def test_normalise_blank_crop_is_blank_and_bad_crop_is_refused():
    assert not normalise_digit(np.zeros((30, 30), np.float32)).any()
    with pytest.raises(ValueError):
        normalise_digit(np.zeros((0, 5)))
    with pytest.raises(ValueError):
        normalise_digit(np.zeros((5, 5, 3)))


def test_finds_dark_ink_on_paper_with_mnist_crops(mnist):
    frame = paper()
    boxes, _ = three_digits(mnist, frame)
    found = DigitFinder().find(to_bgr(frame))
    assert_found(found, boxes)
    assert found.dark_ink.all()
    assert found.images.shape == (3, 28, 28) and found.images.dtype == np.float32
    assert found.boxes.dtype == np.int32 and found.boxes.shape == (3, 4)
    # In reading order, each crop looks like the MNIST image it was written from.
    images, _ = mnist
    for crop, original in zip(found.images, images[:3]):
        assert np.corrcoef(crop.ravel(), original.ravel())[0, 1] > 0.8


def test_finds_light_ink_on_a_dark_board(mnist):
    frame = paper()
    boxes, _ = three_digits(mnist, frame)
    found = DigitFinder().find(to_bgr(255 - frame))
    assert_found(found, boxes)
    assert not found.dark_ink.any()


def test_finds_both_polarities_in_one_frame(mnist):
    """Paper on the left, a board on the right: auto polarity decides per digit."""
    images, _ = mnist
    frame = paper()
    frame[:, 320:] = 40 + (frame[:, 320:] - PAPER)
    left = write(frame, images[0], 100, 150, 80)
    right = write(frame, images[1], 450, 150, 80, ink=230.0)
    found = DigitFinder().find(to_bgr(frame))
    assert_found(found, [left, right])
    assert found.dark_ink[np.argsort(found.boxes[:, 0])].tolist() == [True, False]


def test_polarity_setting_restricts_the_search(mnist):
    frame = paper()
    three_digits(mnist, frame)
    inverse = to_bgr(255 - frame)
    assert len(DigitFinder(DigitFinderSettings(polarity="dark")).find(inverse)) == 0
    assert len(DigitFinder(DigitFinderSettings(polarity="light")).find(inverse)) == 3


def test_uneven_light_and_a_hard_shadow(mnist):
    frame = paper()
    boxes, _ = three_digits(mnist, frame)
    ys, xs = np.mgrid[0:480, 0:640].astype(np.float32)
    gain = 0.55 + 0.5 * xs / 640  # a lamp to the right
    gain[ys > 0.6 * xs] *= 0.5  # a sharp shadow across the lower left, through the middle digit
    found = DigitFinder().find(to_bgr(frame * gain))
    assert_found(found, boxes)


def test_specks_are_ignored(mnist):
    frame = paper()
    boxes, _ = three_digits(mnist, frame)
    rng = np.random.default_rng(1)
    for x, y in rng.integers([0, 0], [640, 480], (60, 2)):
        cv2.circle(frame, (int(x), int(y)), 2, INK, -1)  # dust and pen dots, 5 px across
    found = DigitFinder().find(to_bgr(frame))
    assert all(max(iou(b, box) for box in boxes) >= 0.5 for b in found.boxes)
    assert len(found) == 3


def test_pieces_joined_through_a_neighbour_are_one_digit():
    """Three strokes in a row, each within the join gap of the next but the outer two far apart: one digit."""
    frame = paper()
    for x in (200, 214, 228):
        cv2.rectangle(frame, (x, 200), (x + 5, 259), INK, -1)
    found = DigitFinder().find(to_bgr(frame))
    assert len(found) == 1
    assert iou(found.boxes[0], [200, 200, 34, 60]) >= 0.8, found.boxes


def test_blank_paper_paper_edges_lines_and_blobs_are_not_digits():
    frame = paper()
    frame[:, :90] = 90  # the desk beyond the left edge of the sheet
    frame[400:, :] *= 0.6  # the shadow of a monitor along the bottom
    cv2.rectangle(frame, (560, 0), (600, 80), INK, -1)  # a digit-sized mark cut by the frame border
    cv2.line(frame, (150, 100), (450, 110), INK, 4)  # a ruled line
    cv2.rectangle(frame, (250, 250), (310, 310), INK, -1)  # a solid blob (a sticker)
    found = DigitFinder().find(to_bgr(frame))
    assert len(found) == 0
    assert found.boxes.shape == (0, 4) and found.images.shape == (0, 28, 28)


@pytest.mark.parametrize("grain", [2.0, 4.0, 8.0])
def test_texture_is_not_digits(mnist, grain):
    """A camera pointed at a patterned surface (fabric, wood, a carpet) sees digit-sized marks everywhere;
    none is a digit. A digit on paper beside it still is."""
    images, _ = mnist
    rng = np.random.default_rng(3)
    texture = cv2.GaussianBlur(rng.standard_normal((480, 640)).astype(np.float32), (0, 0), grain)
    frame = 128 + 40 * texture / texture.std()
    frame[:, 400:] = paper()[:, 400:]
    box = write(frame, images[0], 470, 180, 80)
    assert_found(DigitFinder().find(to_bgr(frame)), [box])


def test_boxes_are_in_frame_pixels_at_any_resolution(mnist):
    frame = paper()
    boxes, _ = three_digits(mnist, frame)
    large = cv2.resize(to_bgr(frame), (1280, 960), interpolation=cv2.INTER_LINEAR)
    assert_found(DigitFinder().find(large), [[2 * v for v in box] for box in boxes])
    small = cv2.resize(to_bgr(frame), (320, 240), interpolation=cv2.INTER_AREA)  # below work_width: as is
    assert_found(DigitFinder().find(small), [[v // 2 for v in box] for box in boxes])


def test_grey_frames_are_accepted(mnist):
    frame = paper()
    boxes, _ = three_digits(mnist, frame)
    assert_found(DigitFinder().find(np.clip(frame, 0, 255).astype(np.uint8)), boxes)


@pytest.mark.parametrize(
    "frame, complaint",
    [
        (np.zeros((480, 640, 3), np.float32), "dtype float32"),
        (np.zeros((2, 480, 640, 3), np.uint8), "shape"),
        (np.zeros((480, 640, 4), np.uint8), "shape"),
        (np.zeros((0, 640, 3), np.uint8), "empty"),
        ([[0, 1], [2, 3]], "not a numpy image"),
    ],
)
def test_bad_frames_are_one_clear_error(frame, complaint):
    with pytest.raises(SourceError) as error:
        DigitFinder().find(frame)
    message = str(error.value)
    assert complaint in message and "\n" not in message


def test_settings_are_checked():
    with pytest.raises(ValidationError, match="min_height"):
        DigitFinderSettings(min_height=0.5, max_height=0.3)
    with pytest.raises(ValidationError):
        DigitFinderSettings(polarity="sideways")
    with pytest.raises(ValidationError):
        DigitFinderSettings(min_heigth=0.1)  # a typo is an error, not silently ignored
