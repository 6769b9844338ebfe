"""Find the handwritten digits in a camera frame and prepare each one exactly the way MNIST was made.

This is what makes the MNIST model useful on a real camera (DeepLens-style): the model only knows 28x28
white-on-black digits, fitted in 20x20 and centred by centre of mass, so every digit in the frame is
found, cut out and brought into that form. Everything here is pure numpy/OpenCV on one frame: no I/O.

How digits are found, and why:
- Ink is measured against the local paper, not against a global threshold, so gradients and shadows do
  not matter: a morphological closing (larger than a stroke, smaller than nothing else) estimates the
  paper under each pixel, and ink is how much darker than that paper a pixel is, as a fraction of it.
  Light ink on a dark board is the same sum on the inverted image.
- With polarity "auto" both kinds are looked for. A digit of one polarity produces small false marks of
  the other (the paper inside a 0, between strokes); where a mark of one polarity overlaps a candidate of
  the other, the one with more ink wins. Digits of both kinds in one frame (paper next to a board) work.
- The work happens on a downscaled grey copy (`work_width`), which keeps a 640x480 frame near 1 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import SourceError

MNIST_SIZE = 28
MNIST_BOX = 20
MNIST_CENTRE = 14.0  # where MNIST's centres of mass sit, in pixel-index coordinates (measured: 14.0 +- 0.3)


class DigitFinderSettings(BaseModel):
    """How the finder looks for digits. Heights are fractions of the frame height, so one setting serves
    any camera resolution."""

    model_config = ConfigDict(extra="forbid")

    polarity: Literal["auto", "dark", "light"] = Field(
        "auto", description="dark: dark ink on light paper; light: chalk on a dark board; auto: both"
    )
    min_height: float = Field(0.05, gt=0, lt=1, description="smallest digit, as a fraction of the frame height")
    max_height: float = Field(0.35, gt=0, le=1, description="largest digit, as a fraction of the frame height")
    min_contrast: float = Field(
        0.25, gt=0, lt=1, description="ink must differ from the local paper by this fraction of it"
    )
    max_aspect: float = Field(1.6, gt=0, description="widest digit, width / height; wider marks are lines")
    max_fill: float = Field(0.8, gt=0, le=1, description="solid blobs filling more of their box are not digits")
    join_gap: float = Field(
        0.12, ge=0, lt=1, description="pieces closer than this fraction of their height are one digit"
    )
    work_width: int = Field(320, ge=64, description="frames wider than this are downscaled for finding")
    max_digits: int = Field(16, ge=1, description="keep at most this many digits (the inkiest) per frame")

    @model_validator(mode="after")
    def _heights_ordered(self) -> DigitFinderSettings:
        if self.min_height >= self.max_height:
            raise ValueError(f"min_height ({self.min_height}) must be below max_height ({self.max_height})")
        return self


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
    rows = np.flatnonzero(values.max(axis=1) > 0)
    cols = np.flatnonzero(values.max(axis=0) > 0)
    if rows.size == 0:
        return out
    values = values[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = values.shape
    scale = MNIST_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Both interpolations are weighted means, so the result stays within [0, 1] with no clipping.
    fitted = cv2.resize(values, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    fh, fw = fitted.shape
    mass = float(fitted.sum())
    cy = float(fitted.sum(axis=1) @ np.arange(fh, dtype=np.float32)) / mass
    cx = float(fitted.sum(axis=0) @ np.arange(fw, dtype=np.float32)) / mass
    top = min(max(round(MNIST_CENTRE - cy), 0), MNIST_SIZE - fh)
    left = min(max(round(MNIST_CENTRE - cx), 0), MNIST_SIZE - fw)
    out[top : top + fh, left : left + fw] = fitted
    return out


def _group(boxes: np.ndarray, gap: float) -> np.ndarray:
    """Group index per box: boxes that touch once grown by `gap` x their height are one digit's pieces."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    margin = np.maximum(1.0, gap * boxes[:, 3])
    touch = (
        (x0[:, None] - margin[:, None] <= x1[None, :] + margin[None, :])
        & (x0[None, :] - margin[None, :] <= x1[:, None] + margin[:, None])
        & (y0[:, None] - margin[:, None] <= y1[None, :] + margin[None, :])
        & (y0[None, :] - margin[None, :] <= y1[:, None] + margin[:, None])
    )
    group = np.arange(len(boxes))
    while True:  # label propagation: each box takes the smallest group among the boxes it touches
        merged = np.where(touch, group[None, :], len(boxes)).min(axis=1)
        if np.array_equal(merged, group):
            return group
        group = merged[merged]


@dataclass(frozen=True)
class _Candidates:
    """Digit candidates of one polarity, in work-image pixels."""

    boxes: np.ndarray  # (N, 4) x, y, w, h
    mass: np.ndarray  # (N,) ink pixels in the box
    members: list[list[np.ndarray]]  # the outer contours of each candidate's pieces
    ink: np.ndarray  # the relative-contrast image the candidates were cut from
    dark: bool


class DigitFinder:
    """Finds the digits in BGR frames; one instance serves every frame of a source (it keeps no state)."""

    def __init__(self, settings: DigitFinderSettings | None = None):
        self.settings = settings or DigitFinderSettings()

    def find(self, frame: np.ndarray) -> FoundDigits:
        frame = check_frame(frame)
        s = self.settings
        grey = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        height, width = grey.shape
        factor = max(1.0, width / s.work_width)
        if factor > 1:
            size = (max(1, round(width / factor)), max(1, round(height / factor)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        work_h = grey.shape[0]
        min_h, max_h = s.min_height * work_h, s.max_height * work_h
        # The paper estimate must bridge the widest stroke (MNIST strokes are ~15% of the digit height).
        side = max(3, int(0.2 * max_h) | 1)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
        found: list[_Candidates] = []
        if s.polarity in ("auto", "dark"):
            paper = cv2.morphologyEx(grey, cv2.MORPH_CLOSE, kernel)
            found.append(self._candidates(cv2.divide(cv2.subtract(paper, grey), paper, scale=255), True, min_h, max_h))
        if s.polarity in ("auto", "light"):
            board = cv2.morphologyEx(grey, cv2.MORPH_OPEN, kernel)
            found.append(
                self._candidates(
                    cv2.divide(cv2.subtract(grey, board), cv2.bitwise_not(board), scale=255), False, min_h, max_h
                )
            )
        keep = _overlap_winners(found)
        return self._digits(found, keep, factor, (width, height))

    def _candidates(self, ink: np.ndarray, dark: bool, min_h: float, max_h: float) -> _Candidates:
        s = self.settings
        _, mask = cv2.threshold(ink, round(255 * s.min_contrast), 255, cv2.THRESH_BINARY)
        # Outer contours, not connectedComponentsWithStats: on a sparse mask they are ~15x faster.
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        empty = _Candidates(np.zeros((0, 4), np.int32), np.zeros(0), [], ink, dark)
        if not contours:
            return empty
        pieces = np.array([cv2.boundingRect(c) for c in contours], np.int64)
        # Specks are dropped before grouping so that noise never glues two digits together.
        big = np.flatnonzero(pieces[:, 3] >= max(2.0, 0.15 * min_h))
        if len(big) == 0:
            return empty
        pieces = pieces[big]
        group = _group(pieces.astype(np.float64), s.join_gap)
        groups, inverse = np.unique(group, return_inverse=True)
        x0 = np.full(len(groups), np.iinfo(np.int64).max)
        y0 = x0.copy()
        x1 = np.zeros(len(groups), np.int64)
        y1 = x1.copy()
        np.minimum.at(x0, inverse, pieces[:, 0])
        np.minimum.at(y0, inverse, pieces[:, 1])
        np.maximum.at(x1, inverse, pieces[:, 0] + pieces[:, 2])
        np.maximum.at(y1, inverse, pieces[:, 1] + pieces[:, 3])
        w, h = x1 - x0, y1 - y0
        work_h, work_w = ink.shape
        inside = (x0 > 0) & (y0 > 0) & (x1 < work_w) & (y1 < work_h)  # paper edges and frame borders
        sized = np.flatnonzero(inside & (h >= min_h) & (h <= max_h) & (w <= s.max_aspect * h))
        mass = np.array([cv2.countNonZero(mask[y0[g] : y1[g], x0[g] : x1[g]]) for g in sized], np.float64)
        solid = mass > s.max_fill * w[sized] * h[sized]
        chosen, mass = sized[~solid], mass[~solid]
        boxes = np.stack([x0, y0, w, h], axis=1)[chosen].astype(np.int32)
        members = [[contours[big[j]] for j in np.flatnonzero(inverse == g)] for g in chosen]
        return _Candidates(boxes, mass, members, ink, dark)

    def _digits(
        self, found: list[_Candidates], keep: list[np.ndarray], factor: float, frame_size: tuple[int, int]
    ) -> FoundDigits:
        picked = [(c, i) for c, k in zip(found, keep) for i in np.flatnonzero(k)]
        if len(picked) > self.settings.max_digits:
            picked.sort(key=lambda ci: -ci[0].mass[ci[1]])
            picked = picked[: self.settings.max_digits]
        picked.sort(key=lambda ci: (ci[0].boxes[ci[1], 1] + ci[0].boxes[ci[1], 3] // 2, ci[0].boxes[ci[1], 0]))
        images = np.zeros((len(picked), MNIST_SIZE, MNIST_SIZE), np.float32)
        boxes = np.zeros((len(picked), 4), np.int32)
        dark = np.zeros(len(picked), bool)
        for n, (cands, i) in enumerate(picked):
            images[n] = normalise_digit(self._ink_crop(cands, i))
            boxes[n] = _to_frame(cands.boxes[i], factor, frame_size)
            dark[n] = cands.dark
        return FoundDigits(boxes=boxes, images=images, dark_ink=dark)

    def _ink_crop(self, cands: _Candidates, i: int) -> np.ndarray:
        """The digit's ink as MNIST-like intensities: background 0, the body of the strokes 1."""
        x, y, w, h = (int(v) for v in cands.boxes[i])
        ink = cands.ink[y : y + h, x : x + w]
        # Only this digit's pieces (filled, grown by a pixel to keep the anti-aliased edge): a neighbour
        # reaching into the box is not part of it.
        own = np.zeros((h, w), np.uint8)
        cv2.drawContours(own, cands.members[i], -1, 255, thickness=cv2.FILLED, offset=(-x, -y))
        own = cv2.dilate(own, None)
        floor = 0.5 * 255 * self.settings.min_contrast
        inked = ink[(own > 0) & (ink > floor)]
        body = float(np.partition(inked, 3 * inked.size // 4)[3 * inked.size // 4]) if inked.size else 255.0
        values = (np.minimum(ink, body).astype(np.float32) - floor) * np.float32(1 / max(body - floor, 1.0))
        return np.maximum(values, 0.0, out=values) * (own > 0)


def _overlap_winners(found: list[_Candidates]) -> list[np.ndarray]:
    """Per polarity, which candidates survive: where opposite polarities overlap, the inkier one wins."""
    keep = [np.ones(len(c.boxes), bool) for c in found]
    if len(found) == 2 and len(found[0].boxes) and len(found[1].boxes):
        a, b = found[0].boxes, found[1].boxes
        overlap = (
            (a[:, None, 0] < b[None, :, 0] + b[None, :, 2])
            & (b[None, :, 0] < a[:, None, 0] + a[:, None, 2])
            & (a[:, None, 1] < b[None, :, 1] + b[None, :, 3])
            & (b[None, :, 1] < a[:, None, 1] + a[:, None, 3])
        )
        heavier = found[0].mass[:, None] > found[1].mass[None, :]
        keep[0] = ~(overlap & ~heavier).any(axis=1)
        keep[1] = ~(overlap & heavier).any(axis=0)
    return keep


def _to_frame(box: np.ndarray, factor: float, frame_size: tuple[int, int]) -> np.ndarray:
    """A work-image box -> the frame-pixel box that covers it."""
    width, height = frame_size
    x0 = int(np.floor(box[0] * factor))
    y0 = int(np.floor(box[1] * factor))
    x1 = min(width, int(np.ceil((box[0] + box[2]) * factor)))
    y1 = min(height, int(np.ceil((box[1] + box[3]) * factor)))
    return np.array([x0, y0, x1 - x0, y1 - y0], np.int32)
