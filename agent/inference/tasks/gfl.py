"""Anchor-free detectors with Generalized Focal Loss heads (NanoDet): class scores and distance distributions
per grid point.

Each level of the feature pyramid has a grid of anchor points, one per cell; for each point the model gives
a score per class and, for each of the box's four edges (left, top, right, bottom), a distribution over
0..reg_max strides. The distance to the edge is the distribution's expectation (softmax over the bins, then
the mean), times the level's stride. Li et al., "Generalized Focal Loss", 2020; NanoDet's GFLHead.
"""

from __future__ import annotations

import math

import numpy as np

from agent.bundles.bundle import GflDecoding
from agent.inference.tasks.boxes import Candidates


def anchor_points(decoding: GflDecoding) -> tuple[np.ndarray, np.ndarray]:
    """Anchor points (N, 2) as x, y in input pixels and the stride (N,) of each, level by level, row by row."""
    points, strides = [], []
    for stride in decoding.strides:
        rows, columns = math.ceil(decoding.input_size_height / stride), math.ceil(decoding.input_size_width / stride)
        y, x = np.mgrid[0:rows, 0:columns].astype(np.float32)
        points.append((np.stack([x.ravel(), y.ravel()], axis=1) + decoding.center_offset) * stride)
        strides.append(np.full(rows * columns, stride, np.float32))
    return np.concatenate(points), np.concatenate(strides)


class GflDecoder:
    """Distributions (1, N, 4 * (reg_max + 1)) and scores (1, N, classes) -> candidates in normalized input
    coordinates: one per anchor point and class scoring at least the threshold (as NanoDet's multi-class
    NMS takes them; suppression follows in the task)."""

    def __init__(self, decoding: GflDecoding):
        self.decoding = decoding
        self.points, self.strides = anchor_points(decoding)
        self.bins = np.arange(decoding.reg_max + 1, dtype=np.float32)

    @property
    def values_per_point(self) -> int:
        return 4 * len(self.bins)

    def decode(self, raw_boxes: np.ndarray, raw_scores: np.ndarray, score_threshold: float) -> Candidates:
        d = self.decoding
        scores = raw_scores.reshape(len(self.points), -1)
        anchors, classes = np.nonzero(scores >= score_threshold)
        logits = raw_boxes.reshape(len(self.points), 4, len(self.bins))[anchors]
        weights = np.exp(logits - logits.max(axis=2, keepdims=True))
        distances = (weights @ self.bins) / weights.sum(axis=2) * self.strides[anchors, None]  # (K, 4): left, top, right, bottom
        centre = self.points[anchors]
        boxes = np.concatenate([centre - distances[:, :2], centre + distances[:, 2:]], axis=1) / np.float32([d.input_size_width, d.input_size_height] * 2)
        return Candidates(boxes.astype(np.float32), scores[anchors, classes].astype(np.float32), classes.astype(np.int64), np.zeros((len(anchors), 0, 2), np.float32))
