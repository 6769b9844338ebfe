"""Boxes as detectors need them: overlap (IoU), non-maximum suppression, and matching against ground truth.

Boxes are float arrays (N, 4) of xmin, ymin, xmax, ymax in any one coordinate system.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box with each of `boxes`."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass(frozen=True)
class Candidates:
    """Detections of one frame before (or after) suppression: boxes (N, 4), scores (N,), classes (N,),
    keypoints (N, K, 2) as x, y (K may be 0)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    keypoints: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index) -> Candidates:
        return Candidates(self.boxes[index], self.scores[index], self.classes[index], self.keypoints[index])

    def best(self, count: int) -> Candidates:
        """The `count` highest scoring, best first."""
        return self.take(np.argsort(-self.scores, kind="stable")[:count])


def suppress(found: Candidates, iou_threshold: float, weighted: bool) -> Candidates:
    """Non-maximum suppression within each class: a candidate overlapping a better one of its class by more
    than `iou_threshold` is the same object. Weighted (MediaPipe's WEIGHTED algorithm), the object's box and
    keypoints are the score-weighted mean of all its candidates and its score the best one's; otherwise the
    best candidate is kept as it is. Best first."""
    if len(found) < 2:
        return found
    boxes, scores, keypoints, classes = [], [], [], []
    for label in np.unique(found.classes):
        group = found.take(found.classes == label)
        order = np.argsort(-group.scores, kind="stable")
        while len(order):
            top = order[0]
            same = iou(group.boxes[top], group.boxes[order]) > iou_threshold
            same[0] = True  # the best is its own object even when its box has no area
            members, order = order[same], order[~same]
            if weighted and len(members) > 1:
                weights = group.scores[members] / group.scores[members].sum()
                boxes.append(weights @ group.boxes[members])
                keypoints.append(np.tensordot(weights, group.keypoints[members], axes=1))
            else:
                boxes.append(group.boxes[top])
                keypoints.append(group.keypoints[top])
            scores.append(group.scores[top])
            classes.append(label)
    if not scores:
        return found.take(slice(0, 0))
    kept = Candidates(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(classes), np.array(keypoints, np.float32).reshape(len(scores), *found.keypoints.shape[1:]))
    return kept.best(len(kept))


@dataclass(frozen=True)
class Matched:
    """How one image's detections compare with its ground truth."""

    true_positives: int
    false_positives: int
    false_negatives: int


def match(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, truth: np.ndarray, truth_classes: np.ndarray, min_iou: float = 0.5) -> Matched:
    """Greedy, best score first: a detection is right when it overlaps an unmatched true box of its class by at
    least `min_iou`; every other detection is false, every true box left unmatched is missed."""
    unmatched = np.ones(len(truth), bool)
    hits = 0
    for i in np.argsort(-scores, kind="stable"):
        if not unmatched.any():
            break
        overlap = np.where(unmatched & (truth_classes == classes[i]), iou(boxes[i], truth), 0.0) if len(truth) else np.zeros(0)
        if len(overlap) and overlap.max() >= min_iou:
            unmatched[int(np.argmax(overlap))] = False
            hits += 1
    return Matched(hits, len(boxes) - hits, int(unmatched.sum()))
