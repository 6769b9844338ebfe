"""Find the handwritten digits in a camera frame and prepare each one exactly the way MNIST was made.

This is what makes the MNIST model useful on a real camera (DeepLens-style): the model only knows 28x28
white-on-black digits, fitted in 20x20 and centred by centre of mass, so every digit in the frame is
found, cut out and brought into that form. Everything here is pure numpy/OpenCV on one frame: no I/O.

How digits are found, and why:
- Ink is measured against the paper right around it, not against a global threshold, so gradients and
  shadows do not matter: a morphological closing wider than any stroke estimates the paper under each
  pixel, and ink is how much darker than that paper a pixel is, as a fraction of it. Chalk on a board is
  the mirror image (an opening, and lighter instead of darker).
- A digit is faint ink around strong ink (hysteresis), its pieces close together are one digit, and it
  is digit-sized, not touching the frame (paper edges), not a long line or a solid blob, and its ink
  stands out from the surface around it (the median of the pixels around it that are not ink).
- With polarity "auto" both kinds are looked for, so a frame may hold paper and a board. Each polarity
  makes false marks of the other kind (the paper inside a 0, a strip of paper between a stroke and a
  shadow); they are the surface itself, so they do not stand out from the median around them, and where
  two candidates of opposite polarity overlap, the one that stands out more wins.
- The work happens on a downscaled grey copy (`work_width`), which keeps a 640x480 frame near 1 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from agent.errors import SourceError
from agent.settings import DigitFinderSettings

MNIST_SIZE = 28
MNIST_BOX = 20
# Ink contrast is measured as a fraction of the brighter side (the paper under dark ink, the chalk itself
# on a board), but never of less than this many grey levels: in the dark, a fraction of nothing is noise.
DIMMEST_PAPER = 96
MNIST_CENTRE = 14.0  # where MNIST's centres of mass sit, in pixel-index coordinates (measured: 14.0 +- 0.3)


@dataclass(frozen=True)
class FoundDigits:
    """The digits of one frame, in reading order (top to bottom, then left to right).

    boxes: (N, 4) int32, x, y, w, h in frame pixels. images: (N, 28, 28) float32 in [0, 1], MNIST-ready.
    dark_ink: (N,) bool, True where the digit was dark ink on light paper.
    """

    boxes: np.ndarray
    images: np.ndarray
    dark_ink: np.ndarray

    def __len__(self) -> int:
        return len(self.boxes)


def check_frame(frame: object) -> np.ndarray:
    """A frame must be a non-empty uint8 image, grey (H, W) or BGR (H, W, 3); anything else is a source bug."""
    if not isinstance(frame, np.ndarray):
        raise SourceError(f"frame is a {type(frame).__name__}, not a numpy image; read frames with OpenCV")
    if frame.dtype != np.uint8:
        raise SourceError(f"frame has dtype {frame.dtype}, expected uint8; convert it (e.g. cv2.convertScaleAbs)")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise SourceError(f"frame has shape {frame.shape}, expected (H, W) grey or (H, W, 3) BGR")
    if frame.size == 0:
        raise SourceError(f"frame is empty (shape {frame.shape}); the source returned no picture")
    return frame


def ink_against_surface(grey: np.ndarray, kernel: np.ndarray, dark: bool) -> np.ndarray:
    """How much each pixel differs from the surface right around it, 0-255 as a fraction of it: dark ink
    against the paper (a closing wider than a stroke fills the strokes in), or light chalk against the board
    (an opening). Light and shadows change both alike, so they do not change the ink."""
    if dark:
        paper = cv2.morphologyEx(grey, cv2.MORPH_CLOSE, kernel)
        return cv2.divide(cv2.subtract(paper, grey), cv2.max(paper, DIMMEST_PAPER), scale=255)
    board = cv2.morphologyEx(grey, cv2.MORPH_OPEN, kernel)
    return cv2.divide(cv2.subtract(grey, board), cv2.max(grey, DIMMEST_PAPER), scale=255)


def normalise_digit(ink: np.ndarray) -> np.ndarray:
    """A cropped digit, bright ink on black (uint8 or float in [0, 1]) -> the 28x28 float32 MNIST form.

    As MNIST was made: the ink's bounding box is scaled to fit 20x20 with its aspect ratio kept, then
    placed in 28x28 so its centre of mass lands on the centre. A blank crop gives a blank image.
    """
    ink = np.asarray(ink)
    if ink.ndim != 2 or ink.size == 0:
        raise ValueError(f"digit crop has shape {ink.shape}, expected a non-empty 2-D array")
    values = ink.astype(np.float32) * np.float32(1 / 255) if ink.dtype == np.uint8 else ink.astype(np.float32)
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    x, y, w, h = cv2.boundingRect((values > 0).view(np.uint8))
    if w == 0:
        return out
    scale = MNIST_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Both interpolations are weighted means, so the result stays within [0, 1] with no clipping.
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    fitted = cv2.resize(values[y : y + h, x : x + w], size, interpolation=interpolation)
    moments = cv2.moments(fitted)
    fh, fw = fitted.shape
    top = min(max(round(MNIST_CENTRE - moments["m01"] / moments["m00"]), 0), MNIST_SIZE - fh)
    left = min(max(round(MNIST_CENTRE - moments["m10"] / moments["m00"]), 0), MNIST_SIZE - fw)
    out[top : top + fh, left : left + fw] = fitted
    return out


def _group(pieces: list[tuple[int, int, int, int]], gap: float) -> list[list[int]]:
    """Pieces (x, y, w, h) that touch once grown by `gap` x their height are one digit's: the groups, each
    a list of piece indices in order, ordered by their first piece.

    Plain Python, not numpy: a frame has a handful of pieces, and on a handful a numpy call costs more
    than the work it does. Sweeping in order of left edge compares only pieces whose columns overlap.
    """
    grown = []
    for x, y, w, h in pieces:
        margin = max(1.0, gap * h)
        grown.append((x - margin, y - margin, x + w + margin, y + h + margin))
    first = list(range(len(pieces)))  # union-find whose root is always the group's first piece

    def root(i: int) -> int:
        while first[i] != i:
            first[i] = first[first[i]]
            i = first[i]
        return i

    by_left = sorted(range(len(pieces)), key=lambda i: grown[i][0])
    for position, i in enumerate(by_left):
        _, top, right, bottom = grown[i]
        for j in by_left[position + 1 :]:
            left_j, top_j, _, bottom_j = grown[j]
            if left_j > right:
                break
            if top_j <= bottom and top <= bottom_j:
                a, b = root(i), root(j)
                first[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _bounds(pieces: list[tuple[int, int, int, int]], members: list[int]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) around some of the pieces."""
    x, y, w, h = pieces[members[0]]
    x0, y0, x1, y1 = x, y, x + w, y + h
    for k in members[1:]:
        x, y, w, h = pieces[k]
        x0, y0, x1, y1 = min(x0, x), min(y0, y), max(x1, x + w), max(y1, y + h)
    return x0, y0, x1, y1


@dataclass(frozen=True)
class _Candidates:
    """Digit candidates of one polarity, in work-image pixels."""

    boxes: list[tuple[int, int, int, int]]  # x, y, w, h
    mass: list[int]  # ink pixels in the box
    contrast: list[float]  # how far its ink stands out from the surface, as a fraction of the brighter
    members: list[list[np.ndarray]]  # the outer contours of each candidate's pieces
    ink: np.ndarray  # the relative-contrast image the candidates were cut from
    dark: bool


class DigitFinder:
    """Finds the digits in grey (or BGR) frames; one instance serves every frame of a source (it keeps no state)."""

    def __init__(self, settings: DigitFinderSettings | None = None):
        self.settings = settings or DigitFinderSettings()
        self._strong = round(255 * self.settings.min_contrast)  # a digit has ink at least this contrasted
        self._faint = self._strong // 2  # and its strokes are the ink around that above half of it

    def find(self, frame: np.ndarray) -> FoundDigits:
        frame = check_frame(frame)
        s = self.settings
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        height, width = grey.shape
        factor = max(1.0, width / s.work_width)
        if factor > 1:
            size = (max(1, round(width / factor)), max(1, round(height / factor)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        max_h = s.max_height * grey.shape[0]
        # The paper estimate must bridge the widest stroke (MNIST strokes are ~15% of the digit height).
        side = max(3, int(0.2 * max_h) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
        found: list[_Candidates] = []
        if s.polarity in ("auto", "dark"):
            found.append(self._candidates(ink_against_surface(grey, kernel, dark=True), grey, dark=True))
        if s.polarity in ("auto", "light"):
            found.append(self._candidates(ink_against_surface(grey, kernel, dark=False), grey, dark=False))
        return self._digits(found, _overlap_winners(found), factor, (width, height))

    def _candidates(self, ink: np.ndarray, grey: np.ndarray, dark: bool) -> _Candidates:
        s = self.settings
        work_h, work_w = ink.shape
        min_h, max_h = s.min_height * work_h, s.max_height * work_h
        empty = _Candidates([], [], [], [], ink, dark)
        # Hysteresis: a digit is the faint ink around strong ink, so pale strokes (chalk, pencil, a digit in
        # the shade) stay attached to their digit instead of breaking it into pieces.
        _, mask = cv2.threshold(ink, self._faint, 255, cv2.THRESH_BINARY)
        # Outer contours, not connectedComponentsWithStats: on a sparse mask they are ~15x faster.
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not contours:
            return empty
        # Specks are dropped before grouping so that noise never glues two digits together.
        smallest = max(3.0, 0.2 * min_h)
        pieces, outlines = [], []
        for contour in contours:
            rect = cv2.boundingRect(contour)
            if rect[2] >= smallest or rect[3] >= smallest:
                pieces.append(rect)
                outlines.append(contour)
        chosen: list[tuple[int, int, int, int]] = []
        masses, contrasts, pieces_of = [], [], []
        for members in _group(pieces, s.join_gap):  # a handful of candidates, each checked with a few whole-box OpenCV calls
            x, y, x1, y1 = _bounds(pieces, members)
            wg, hg = x1 - x, y1 - y
            if not (x > 0 and y > 0 and x1 < work_w and y1 < work_h):  # paper edges and frame borders
                continue
            if not (min_h <= hg <= max_h and wg <= s.max_aspect * hg):
                continue
            box = (slice(y, y + hg), slice(x, x + wg))
            mass = cv2.countNonZero(mask[box])
            if mass > s.max_fill * wg * hg and 2 * wg > hg:  # a solid blob (an upright 1 is a solid bar)
                continue
            if cv2.minMaxLoc(ink[box])[1] < self._strong:
                continue
            # Ink stands out from the surface it is written on: the pixels around the box that are not
            # ink. The other polarity's false marks (the paper inside a 0, a strip of paper between a
            # stroke and a shadow) are that surface itself.
            ink_level = cv2.mean(grey[box], mask[box])[0]
            grown = _grown(box, hg // 2)
            surface = grey[grown][::2, ::2][mask[grown][::2, ::2] == 0]
            if surface.size == 0:  # nothing but ink around: not a digit on a surface
                continue
            if dark:  # paper: the median of the surface (a shadow beside a digit is not its paper)
                paper = float(np.partition(surface, surface.size // 2)[surface.size // 2])
                contrast = (paper - ink_level) / max(paper, DIMMEST_PAPER)
            else:  # chalk is brighter than nearly all the board around it; lit paper between shadows is not
                board = float(np.partition(surface, 9 * surface.size // 10)[9 * surface.size // 10])
                contrast = (ink_level - board) / max(ink_level, DIMMEST_PAPER)
            if contrast < 0.5 * s.min_contrast:
                continue
            chosen.append((x, y, wg, hg))
            masses.append(mass)
            contrasts.append(contrast)
            pieces_of.append([outlines[k] for k in members])
        if not chosen:
            return empty
        return _Candidates(chosen, masses, contrasts, pieces_of, ink, dark)

    def _digits(
        self, found: list[_Candidates], keep: list[np.ndarray], factor: float, frame_size: tuple[int, int]
    ) -> FoundDigits:
        picked = [(c, i) for c, k in zip(found, keep) for i in np.flatnonzero(k).tolist()]
        picked.sort(key=lambda ci: -ci[0].mass[ci[1]])
        picked = picked[: self.settings.max_digits]
        picked.sort(key=lambda ci: (ci[0].boxes[ci[1]][1] + ci[0].boxes[ci[1]][3] // 2, ci[0].boxes[ci[1]][0]))
        images = np.zeros((len(picked), MNIST_SIZE, MNIST_SIZE), np.float32)
        boxes = np.zeros((len(picked), 4), np.int32)
        for n, (cands, i) in enumerate(picked):
            images[n] = normalise_digit(self._ink_crop(cands, i))
            boxes[n] = _to_frame(cands.boxes[i], factor, frame_size)
        dark = np.array([cands.dark for cands, _ in picked], bool)
        return FoundDigits(boxes=boxes, images=images, dark_ink=dark)

    def _ink_crop(self, cands: _Candidates, i: int) -> np.ndarray:
        """The digit's ink as MNIST-like uint8 intensities: background 0, the body of the strokes 255."""
        x, y, w, h = cands.boxes[i]
        ink = cands.ink[y : y + h, x : x + w]
        # Only this digit's pieces (filled, grown by a pixel to keep the anti-aliased edge): a neighbour
        # reaching into the box is not part of it.
        own = np.zeros((h, w), np.uint8)
        cv2.drawContours(own, cands.members[i], -1, 255, thickness=cv2.FILLED, offset=(-x, -y))
        own = cv2.dilate(own, None)
        inked = ink[(own > 0) & (ink > self._faint)]
        body = int(np.partition(inked, 3 * inked.size // 4)[3 * inked.size // 4]) if inked.size else 255
        stretched = cv2.multiply(cv2.subtract(ink, self._faint), 255.0 / max(body - self._faint, 1))
        return cv2.bitwise_and(stretched, own)


def _grown(box: tuple[slice, slice], by: int) -> tuple[slice, slice]:
    """A (rows, columns) slice pair grown by `by` pixels on every side (numpy clips it at the image)."""
    rows, cols = box
    return slice(max(0, rows.start - by), rows.stop + by), slice(max(0, cols.start - by), cols.stop + by)


def _overlap_winners(found: list[_Candidates]) -> list[np.ndarray]:
    """Per polarity, which candidates survive: where both polarities claim the same place, the one that
    stands out more from the surface wins (a real stroke is much darker, or lighter, than the paper)."""
    keep = [np.ones(len(c.boxes), bool) for c in found]
    if len(found) == 2 and len(found[0].boxes) and len(found[1].boxes):
        a, b = np.array(found[0].boxes), np.array(found[1].boxes)
        overlap = (
            (a[:, None, 0] < b[None, :, 0] + b[None, :, 2])
            & (b[None, :, 0] < a[:, None, 0] + a[:, None, 2])
            & (a[:, None, 1] < b[None, :, 1] + b[None, :, 3])
            & (b[None, :, 1] < a[:, None, 1] + a[:, None, 3])
        )
        stronger = np.array(found[0].contrast)[:, None] >= np.array(found[1].contrast)[None, :]
        keep[0] = ~(overlap & ~stronger).any(axis=1)
        keep[1] = ~(overlap & stronger).any(axis=0)
    return keep


def _to_frame(box: tuple[int, int, int, int], factor: float, frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A work-image box -> the frame-pixel box that covers it."""
    x, y, w, h = box
    width, height = frame_size
    x0, y0 = math.floor(x * factor), math.floor(y * factor)
    x1, y1 = min(width, math.ceil((x + w) * factor)), min(height, math.ceil((y + h) * factor))
    return x0, y0, x1 - x0, y1 - y0
