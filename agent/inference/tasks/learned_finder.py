"""The learned digit finder: a small int8 network marks every digit's centre and box, then each box is cut
from the full-resolution frame and brought into MNIST's form, as the OpenCV finder's digits are.

Why a network: the OpenCV finder decides what is a digit from hand-set rules on ink, so a ruled line that
touches a digit, a neighbour written close by or ink in a deep shadow breaks it (boxes twice too wide,
digits joined or missed). The network learned those conditions from synthetic scenes (models/mnist/finder)
and only says where digits are; reading them stays the classifier's job.

The finder model (finder.tflite in the MNIST bundle, signed with it) has one int8 grey input (1, H, W, 1)
and two outputs on a grid of cells: centres (1, rows, cols, 1), the probability that a digit's centre is in
the cell, and boxes (1, rows, cols, 4): the centre's offset in its cell and log(size / SIZE_UNIT) of the
box in input pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.errors import ModelError, Reason
from agent.inference.backends import open_interpreter
from agent.inference.backends.base import TensorSpec
from agent.inference.tasks.digit_finder import MNIST_SIZE, FoundDigits, check_frame, ink_against_surface, normalise_digit
from agent.settings import DigitFinderSettings

FINDER_FILE = "finder.tflite"
SIZE_UNIT = 8.0  # box sizes are log(size / SIZE_UNIT), size in finder-input pixels
BODY_QUANTILE = 0.95  # a digit's stroke body: this share of its box's ink is fainter
EVEN_KERNEL = 15  # finder-input pixels the local mean is taken over (about 60 frame pixels)
DIMMEST_LOCAL = 8  # grey levels: darker neighbourhoods are not brightened further (noise)
CROP_HEIGHT = 32  # rows a digit is measured at (MNIST draws it in 20): a bigger one is shrunk first
SAME_DIGIT = 0.6  # boxes overlapping this much (of the smaller one) are one digit, found twice
MOSTLY_INSIDE = 0.6  # a piece of ink with this share inside the box belongs to its digit
MIN_PIECE = 0.02  # ...unless it covers less than this share of the box (a speck)
GROWTH = 0.5  # the digit's ink is looked for this share of the box's size around it


@dataclass(frozen=True)
class DigitCrop:
    """One digit cut from a frame: its box fitted to its ink (frame pixels), and that ink."""

    box: tuple[int, int, int, int]
    ink: np.ndarray  # float32 in [0, 1], background 0, strokes 1; only this digit's own strokes
    body: float  # how strongly the strokes stand out: 0-255, as a fraction of the paper
    dark: bool  # dark ink on light paper (False: chalk on a board)


def crop_digit(grey: np.ndarray, box: tuple[int, int, int, int], polarity: str) -> DigitCrop | None:
    """The digit the finder placed at `box`, fitted to its ink, or None when no ink is at the box's centre.

    The region around the box is shrunk to CROP_HEIGHT rows per box height first (MNIST's digit is 20 px:
    more is wasted work). Ink is measured against the paper right around each pixel (a closing wider than a
    stroke; an opening for chalk), so light and shadows do not matter, and only ink at least half as strong
    as the stroke body counts, which drops the fainter ruled and squared lines. With polarity auto, the
    polarity whose strokes differ more from the surface (the median of the region) wins. The digit is the
    ink connected to the centre of the box and the pieces mostly inside it: their extent becomes the box
    (the network's box is only roughly right), bounded to the box grown by GROWTH, and a neighbour's ink
    and the lines running out of the box are left out.
    """
    x, y, w, h = box
    height, width = grey.shape
    margin = max(2, round(GROWTH * max(w, h)))
    x0, y0, x1, y1 = max(0, x - margin), max(0, y - margin), min(width, x + w + margin), min(height, y + h + margin)
    region = grey[y0:y1, x0:x1]
    scale = min(1.0, CROP_HEIGHT / h)
    if scale < 1:
        region = cv2.resize(region, (max(1, round(region.shape[1] * scale)), max(1, round(region.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    top, left = round((y - y0) * scale), round((x - x0) * scale)
    bottom, right = top + max(1, round(h * scale)), left + max(1, round(w * scale))
    inner = (slice(top, bottom), slice(left, right))
    side = max(3, round(h * scale / 2) | 1)  # wider than a stroke (MNIST strokes are ~15% of the height)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    surface = _quantile(region, 0.5)  # the region around the box is mostly the surface
    best: tuple[float, np.ndarray, float, bool] | None = None
    for dark in (True, False):
        if polarity != "auto" and dark != (polarity == "dark"):
            continue
        ink = ink_against_surface(region, kernel, dark)
        body = _quantile(ink[inner], BODY_QUANTILE)
        strokes = (ink[inner] >= 0.5 * body).view(np.uint8)
        # The real strokes differ from the surface; the other polarity's "ink" is the surface between them
        # (the board between grains of chalk, the paper inside a loop).
        stands_out = (surface - cv2.mean(region[inner], strokes)[0]) * (1 if dark else -1)
        if best is None or stands_out > best[0]:
            best = (stands_out, ink, body, dark)
    _, ink, body, dark = best
    floor = 0.5 * body
    count, labels, stats, _ = cv2.connectedComponentsWithStats((ink >= max(floor, 1.0)).view(np.uint8), connectivity=8)
    core_h, core_w = max(1, (bottom - top) // 4), max(1, (right - left) // 4)
    at_centre = np.zeros(count, bool)
    at_centre[labels[top + core_h : bottom - core_h or None, left + core_w : right - core_w or None]] = True
    # A piece mostly inside the box is the digit's too (the detached bar of a 5); specks are not.
    inside = np.bincount(labels[inner].reshape(-1), minlength=count)
    area = stats[:, cv2.CC_STAT_AREA]
    own_pieces = at_centre | ((inside >= MOSTLY_INSIDE * area) & (area >= MIN_PIECE * (bottom - top) * (right - left)))
    own_pieces[0] = False  # the background
    if not at_centre[1:].any():
        return None
    own = own_pieces[labels]
    rows, cols = np.flatnonzero(own.any(axis=1)), np.flatnonzero(own.any(axis=0))
    grow = GROWTH * max(bottom - top, right - left) / 2  # never further than half the margin past the box
    ry0, ry1 = max(rows[0], round(top - grow)), min(rows[-1] + 1, round(bottom + grow))
    rx0, rx1 = max(cols[0], round(left - grow)), min(cols[-1] + 1, round(right + grow))
    if ry1 <= ry0 or rx1 <= rx0:
        return None
    fitted = (slice(ry0, ry1), slice(rx0, rx1))
    digit = np.clip((ink[fitted].astype(np.float32) - floor) * np.float32(1 / max(body - floor, 1.0)), 0, 1) * own[fitted]
    fx0, fy0 = x0 + int(rx0 / scale), y0 + int(ry0 / scale)
    fx1, fy1 = min(width, x0 + int(np.ceil(rx1 / scale))), min(height, y0 + int(np.ceil(ry1 / scale)))
    return DigitCrop((fx0, fy0, fx1 - fx0, fy1 - fy0), digit, body, bool(dark))


def evened(small: np.ndarray) -> np.ndarray:
    """A grey finder-input image divided by its local mean (scaled to 128), so a digit in a deep shadow
    stands out from its paper as much as one in the light: what the network is trained on and sees."""
    local = cv2.blur(small, (EVEN_KERNEL, EVEN_KERNEL))
    return cv2.divide(small, cv2.max(local, DIMMEST_LOCAL), scale=128)


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile of an array's values (a partial sort: cheaper than np.quantile on a few thousand)."""
    flat = values.reshape(-1)
    k = int(q * (flat.size - 1))
    return float(np.partition(flat, k)[k])


class LearnedDigitFinder:
    """Finds digits with the bundle's finder model; one instance serves every frame of a source."""

    def __init__(self, model_path: Path, settings: DigitFinderSettings):
        self.settings = settings
        self._backend = open_interpreter(model_path, threads=1)
        where = str(model_path)
        inputs, outputs = self._backend.inputs, self._backend.outputs
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[0] != 1 or inputs[0].shape[3] != 1:
            raise ModelError(f"{where}: a digit finder has one grey image input (1, H, W, 1), this one {[list(i.shape) for i in inputs]}; use a finder made by models/mnist/finder", Reason.TENSOR_MISMATCH)
        by_channels = {o.shape[-1]: (n, o) for n, o in enumerate(outputs)}
        if len(outputs) != 2 or set(by_channels) != {1, 4} or outputs[0].shape[1:3] != outputs[1].shape[1:3]:
            raise ModelError(f"{where}: a digit finder has outputs centres (1, rows, cols, 1) and boxes (1, rows, cols, 4), this one {[list(o.shape) for o in outputs]}; use a finder made by models/mnist/finder", Reason.TENSOR_MISMATCH)
        self._input: TensorSpec = inputs[0]
        (self._centres_at, self._centres), (self._boxes_at, self._boxes) = by_channels[1], by_channels[4]
        _, self._in_h, self._in_w, _ = self._input.shape
        self._stride = self._in_w / self._centres.shape[2]
        # Centre scores are compared as the model's own integers, order-preserved into uint8 for OpenCV.
        level = round(settings.centre_score / self._centres.scale) + self._centres.zero_point
        self._level = int(np.clip(level, -128, 127)) + 128

    def find(self, frame: np.ndarray) -> FoundDigits:
        frame = check_frame(frame)
        s = self.settings
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        height, width = grey.shape
        small = cv2.resize(grey, (self._in_w, self._in_h), interpolation=cv2.INTER_AREA)
        outputs = self._backend.run([self._input.quantize(evened(small)[None, ..., None] * np.float32(1 / 255))])
        centres = (outputs[self._centres_at][0, ..., 0].view(np.uint8) ^ 0x80)  # int8 -> uint8, order kept
        rows, cols = np.nonzero((centres >= self._level) & (centres == cv2.dilate(centres, None)))
        if len(rows) == 0:
            return _no_digits()
        order = np.argsort(-centres[rows, cols], kind="stable")[: s.max_digits]
        rows, cols = rows[order], cols[order]
        raw = self._boxes.dequantize(outputs[self._boxes_at][0, rows, cols])
        sx, sy = width / self._in_w, height / self._in_h
        cx, cy = (cols + raw[:, 0]) * self._stride * sx, (rows + raw[:, 1]) * self._stride * sy
        w, h = np.exp(raw[:, 2]) * SIZE_UNIT * sx, np.exp(raw[:, 3]) * SIZE_UNIT * sy
        boxes, images, dark_ink = [], [], []
        strong = 255 * s.learned_min_contrast
        for bx, by, bw, bh in zip(cx - w / 2, cy - h / 2, w, h):
            x0, y0 = max(0, int(round(bx))), max(0, int(round(by)))
            x1, y1 = min(width, int(round(bx + bw))), min(height, int(round(by + bh)))
            if not (s.min_height * height <= y1 - y0 <= s.max_height * height) or x1 - x0 < 2:
                continue
            crop = crop_digit(grey, (x0, y0, x1 - x0, y1 - y0), s.polarity)
            if crop is None or crop.body < strong:  # nothing written there stands out from the paper
                continue
            if any(_overlap(crop.box, kept) > SAME_DIGIT for kept in boxes):  # two centres found on one digit
                continue
            boxes.append(crop.box)
            images.append(normalise_digit(crop.ink))
            dark_ink.append(crop.dark)
        if not boxes:
            return _no_digits()
        reading = sorted(range(len(boxes)), key=lambda i: (boxes[i][1] + boxes[i][3] // 2, boxes[i][0]))
        return FoundDigits(
            boxes=np.array([boxes[i] for i in reading], np.int32),
            images=np.stack([images[i] for i in reading]),
            dark_ink=np.array([dark_ink[i] for i in reading], bool),
        )


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box: a digit's box inside another's is the same digit."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / max(min(a[2] * a[3], b[2] * b[3]), 1)


def _no_digits() -> FoundDigits:
    return FoundDigits(np.zeros((0, 4), np.int32), np.zeros((0, MNIST_SIZE, MNIST_SIZE), np.float32), np.zeros(0, bool))
