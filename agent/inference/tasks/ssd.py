"""Single-shot detectors that output raw box regressors and class scores per anchor (the BlazeFace family).

The anchors are made from the manifest's options exactly as MediaPipe's SsdAnchorsCalculator makes them, and
the raw outputs decoded as its TensorsToDetectionsCalculator does, so a MediaPipe model's graph options can be
copied into a manifest as they are.
"""

from __future__ import annotations

import math

import numpy as np

from agent.bundles.bundle import SsdAnchors, SsdDecoding
from agent.inference.tasks.boxes import Candidates


def _scale(options: SsdAnchors, index: int) -> float:
    count = len(options.strides)
    if count == 1:
        return (options.min_scale + options.max_scale) * 0.5
    return options.min_scale + (options.max_scale - options.min_scale) * index / (count - 1.0)


def ssd_anchors(options: SsdAnchors) -> np.ndarray:
    """Anchors (N, 4) as x_center, y_center, w, h in the input's normalized coordinates."""
    if not options.feature_map_height and len(options.strides) != options.num_layers:
        raise ValueError(f"anchors: {options.num_layers} layers need {options.num_layers} strides (or feature map sizes), not {len(options.strides)}")
    anchors = []
    layer = 0
    while layer < options.num_layers:
        sizes: list[tuple[float, float]] = []  # (height, width) of each anchor at a grid position
        last = layer
        # Layers of the same stride share one grid: their anchors are merged, in order.
        while last < len(options.strides) and options.strides[last] == options.strides[layer]:
            scale = _scale(options, last)
            if last == 0 and options.reduce_boxes_in_lowest_layer:
                ratios_scales = [(1.0, 0.1), (2.0, scale), (0.5, scale)]
            else:
                ratios_scales = [(ratio, scale) for ratio in options.aspect_ratios]
                if options.interpolated_scale_aspect_ratio > 0:
                    following = 1.0 if last == len(options.strides) - 1 else _scale(options, last + 1)
                    ratios_scales.append((options.interpolated_scale_aspect_ratio, math.sqrt(scale * following)))
            sizes += [(s / math.sqrt(r), s * math.sqrt(r)) for r, s in ratios_scales]
            last += 1
        if options.feature_map_height:
            rows, columns = options.feature_map_height[layer], options.feature_map_width[layer]
        else:
            stride = options.strides[layer]
            rows, columns = math.ceil(options.input_size_height / stride), math.ceil(options.input_size_width / stride)
        for y in range(rows):
            for x in range(columns):
                centre = ((x + options.anchor_offset_x) / columns, (y + options.anchor_offset_y) / rows)
                for height, width in sizes:
                    anchors.append((*centre, 1.0, 1.0) if options.fixed_anchor_size else (*centre, width, height))
        layer = max(last, layer + 1)
    return np.array(anchors, np.float32)


def _logit(probability: float) -> float:
    """The logit whose sigmoid is `probability` (-inf and inf at 0 and 1)."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability / (1.0 - probability))


class SsdDecoder:
    """Raw regressors (1, N, num_coords) and scores (1, N, classes) -> candidates in normalized input coordinates."""

    def __init__(self, decoding: SsdDecoding):
        self.decoding = decoding
        self.anchors = ssd_anchors(decoding.anchors)

    def decode(self, raw_boxes: np.ndarray, raw_scores: np.ndarray, score_threshold: float) -> Candidates:
        d = self.decoding
        logits = raw_scores.reshape(len(self.anchors), -1)
        if d.score_clipping_thresh is not None:
            logits = np.clip(logits, -d.score_clipping_thresh, d.score_clipping_thresh)
        classes = np.argmax(logits, axis=1)
        best = logits[np.arange(len(logits)), classes]
        if d.sigmoid_score:  # compared as logits, so only the few kept are put through the sigmoid
            kept = np.flatnonzero(best >= _logit(score_threshold))
            best = 0.5 * (1.0 + np.tanh(0.5 * best[kept]))  # the sigmoid, without overflow for large logits
        else:
            kept = np.flatnonzero(best >= score_threshold)
            best = best[kept]
        raw = raw_boxes.reshape(len(self.anchors), d.num_coords)[kept]
        anchors = self.anchors[kept]
        box = raw[:, d.box_coord_offset : d.box_coord_offset + 4]
        x, y, w, h = (box[:, 0], box[:, 1], box[:, 2], box[:, 3]) if d.reverse_output_order else (box[:, 1], box[:, 0], box[:, 3], box[:, 2])
        x = x / d.x_scale * anchors[:, 2] + anchors[:, 0]
        y = y / d.y_scale * anchors[:, 3] + anchors[:, 1]
        if d.apply_exponential_on_box_size:
            w, h = np.exp(w / d.w_scale) * anchors[:, 2], np.exp(h / d.h_scale) * anchors[:, 3]
        else:
            w, h = w / d.w_scale * anchors[:, 2], h / d.h_scale * anchors[:, 3]
        boxes = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], axis=1)
        points = np.zeros((len(kept), d.num_keypoints, 2), np.float32)
        for k in range(d.num_keypoints):
            offset = d.keypoint_coord_offset + k * d.num_values_per_keypoint
            px, py = (raw[:, offset], raw[:, offset + 1]) if d.reverse_output_order else (raw[:, offset + 1], raw[:, offset])
            points[:, k, 0] = px / d.x_scale * anchors[:, 2] + anchors[:, 0]
            points[:, k, 1] = py / d.y_scale * anchors[:, 3] + anchors[:, 1]
        return Candidates(boxes.astype(np.float32), best.astype(np.float32), classes[kept], points)
