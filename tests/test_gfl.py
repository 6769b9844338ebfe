"""The `gfl-distance` decoding (NanoDet's Generalized Focal Loss head) on hand-made outputs: anchor points,
distance distributions to boxes, score thresholds, and the manifest checks around it."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from agent.bundles.bundle import GflDecoding
from agent.inference.tasks.gfl import GflDecoder, anchor_points

REG_MAX = 4
SIZE = 32


def decoding(**changes) -> GflDecoding:
    return GflDecoding(**{"strides": [8, 16], "reg_max": REG_MAX, "input_size_height": SIZE, "input_size_width": SIZE, **changes})


def peaked(bins: list[float]) -> np.ndarray:
    """Logits (4, reg_max + 1) whose softmax puts (almost) all weight on one bin per edge; a fractional bin
    splits the weight between its two neighbours equally."""
    logits = np.full((4, REG_MAX + 1), -30.0, np.float32)
    for edge, position in enumerate(bins):
        low = int(np.floor(position))
        if position == low:
            logits[edge, low] = 30.0
        else:
            logits[edge, [low, low + 1]] = 30.0
    return logits


def outputs(points: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((1, points, 4 * (REG_MAX + 1)), np.float32), np.zeros((1, points, classes), np.float32)


def test_anchor_points_are_cell_centres_level_by_level_row_by_row():
    points, strides = anchor_points(decoding())
    assert points.shape == (16 + 4, 2) and strides.tolist() == [8.0] * 16 + [16.0] * 4
    assert points[0].tolist() == [4.0, 4.0] and points[1].tolist() == [12.0, 4.0] and points[5].tolist() == [12.0, 12.0]
    assert points[16].tolist() == [8.0, 8.0] and points[19].tolist() == [24.0, 24.0]
    corner, _ = anchor_points(decoding(center_offset=0.0, strides=[16]))
    assert corner.tolist() == [[0, 0], [16, 0], [0, 16], [16, 16]]
    odd, _ = anchor_points(decoding(strides=[16], input_size_width=40))  # a partial cell counts (ceil)
    assert len(odd) == 2 * 3


def test_a_known_distance_distribution_gives_a_known_box():
    boxes, scores = outputs(20, 3)
    boxes[0, 5] = peaked([2, 3, 1, 4]).ravel()  # point (12, 12), stride 8: left 16, top 24, right 8, bottom 32
    scores[0, 5, 2] = 0.9
    found = GflDecoder(decoding()).decode(boxes, scores, 0.5)
    assert found.classes.tolist() == [2] and found.scores.tolist() == pytest.approx([0.9])
    assert (found.boxes[0] * SIZE).tolist() == pytest.approx([12 - 16, 12 - 24, 12 + 8, 12 + 32], abs=1e-4)
    assert found.keypoints.shape == (1, 0, 2)


def test_the_distance_is_the_expectation_of_the_distribution_times_the_level_stride():
    boxes, scores = outputs(20, 1)
    boxes[0, 19] = peaked([0.5, 1, 2.5, 4]).ravel()  # point (24, 24), stride 16: 8, 16, 40, 64
    scores[0, 19, 0] = 0.6
    found = GflDecoder(decoding()).decode(boxes, scores, 0.5)
    assert (found.boxes[0] * SIZE).tolist() == pytest.approx([24 - 8, 24 - 16, 24 + 40, 24 + 64], abs=1e-3)
    uniform, _ = outputs(20, 1)  # equal logits: the mean bin, 2 strides on every side
    found = GflDecoder(decoding()).decode(uniform, scores, 0.5)
    assert (found.boxes[0] * SIZE).tolist() == pytest.approx([24 - 32, 24 - 32, 24 + 32, 24 + 32], abs=1e-4)


def test_every_point_and_class_at_or_above_the_threshold_is_a_candidate_and_nothing_else():
    boxes, scores = outputs(20, 3)
    scores[0, 0] = [0.7, 0.5, 0.49]
    scores[0, 17, 1] = 0.2
    found = GflDecoder(decoding()).decode(boxes, scores, 0.5)
    assert sorted(zip(found.classes.tolist(), found.scores.tolist())) == [(0, pytest.approx(0.7)), (1, pytest.approx(0.5))]
    assert len(GflDecoder(decoding()).decode(boxes, scores, 0.8)) == 0


def test_a_gfl_manifest_section_is_checked_by_its_type():
    assert decoding().type == "gfl-distance" and decoding().center_offset == 0.5
    with pytest.raises(ValidationError):
        GflDecoding(strides=[], reg_max=REG_MAX, input_size_height=SIZE, input_size_width=SIZE)
    with pytest.raises(ValidationError):
        GflDecoding(strides=[8], reg_max=0, input_size_height=SIZE, input_size_width=SIZE)
