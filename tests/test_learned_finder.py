"""The learned digit finder (issue 14): the shipped bundle's finder.tflite on real frames through real TFLite,
how the mnist-digits task picks a finder, and what it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundle_helpers import copy_bundle, repack, test_key  # noqa: F401 (fixture)
from clip_scoring import decode, read_clip

from agent.errors import ModelError, Reason
from agent.inference.model import load_model
from agent.inference.tasks.digit_finder import DigitFinder
from agent.inference.tasks.learned_finder import FINDER_FILE, LearnedDigitFinder, crop_digit
from agent.settings import DigitFinderSettings, ModelSettings, TaskSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist" / "sample"
BUNDLE = ROOT / "models" / "mnist" / "bundle"
MIN_RIGHT = {"sample.avi": 0.98, "sample_hard.avi": 0.97}  # measured: see tests/benchmarks/bench_finders.py
MAX_FALSE_SHARE = 0.01


@pytest.fixture(scope="module")
def model():
    return load_model(BUNDLE, ModelSettings(), TaskSettings())


def grey_frames(name: str) -> list[np.ndarray]:
    return [cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) for frame in decode(SAMPLE / name)]


def test_the_shipped_bundle_finds_digits_with_its_learned_finder_by_default(model):
    assert FINDER_FILE in model.manifest.files  # signed and hashed with the classifier
    assert isinstance(model.task._finder, LearnedDigitFinder)


@pytest.mark.parametrize("clip, truth_file", [("sample_hard.avi", "truth_hard.json"), ("sample.avi", "truth.json")])
def test_learned_finder_reads_both_clips(model, clip, truth_file):
    truth = json.loads((SAMPLE / truth_file).read_text())
    score = read_clip(grey_frames(clip), truth, LearnedDigitFinder(BUNDLE / FINDER_FILE, DigitFinderSettings()), model)
    print(score.summary(f"learned finder on {clip}"))
    assert score.right / score.total >= MIN_RIGHT[clip], score.wrong[:10]
    assert score.false <= MAX_FALSE_SHARE * score.total
    assert score.blank_false == 0


def test_the_opencv_finder_stays_selectable(model):
    frames = grey_frames("sample_hard.avi")[:40]
    chosen = load_model(BUNDLE, ModelSettings(), TaskSettings(mnist_digits=DigitFinderSettings(finder="opencv")))
    reference = DigitFinder()
    for frame in frames:
        inference = chosen.infer(frame, 0.0)
        assert [p.box.model_dump() for p in inference.predictions] == [
            {"x": int(x), "y": int(y), "w": int(w), "h": int(h)} for x, y, w, h in reference.find(frame).boxes
        ]


def test_asking_for_the_learned_finder_of_a_bundle_without_one_is_refused(tmp_path, test_key):
    bundle = copy_bundle(tmp_path / "b")
    (bundle / FINDER_FILE).unlink()
    repack(bundle, test_key[0])
    settings = ModelSettings(trusted_keys=[test_key[1]])
    assert isinstance(load_model(bundle, settings, TaskSettings()).task._finder, DigitFinder)  # auto: OpenCV's
    with pytest.raises(ModelError, match="finder is learned but this bundle has no finder.tflite") as caught:
        load_model(bundle, settings, TaskSettings(mnist_digits=DigitFinderSettings(finder="learned")))
    assert caught.value.reason == Reason.INVALID_BUNDLE and "\n" not in str(caught.value)


def test_a_finder_model_with_the_wrong_tensors_is_refused(tmp_path, test_key):
    bundle = copy_bundle(tmp_path / "b")
    shutil.copy(bundle / "model.tflite", bundle / FINDER_FILE)  # the classifier is no finder
    repack(bundle, test_key[0])
    with pytest.raises(ModelError, match="a digit finder has outputs centres") as caught:
        load_model(bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    assert caught.value.reason == Reason.TENSOR_MISMATCH


def test_a_digit_crop_leaves_out_the_ruled_line_through_it_and_fits_the_ink():
    paper = np.full((120, 200), 225, np.uint8)
    cv2.line(paper, (0, 60), (199, 60), 175, 2)  # a blue rule seen in grey: a quarter darker than the paper
    cv2.line(paper, (100, 30), (100, 90), 50, 5)  # a "1" in black pen, crossing it
    crop = crop_digit(paper, (88, 36, 26, 50), "auto")  # the network's box: roughly right
    assert crop is not None and crop.dark and crop.body > 150
    x, y, w, h = crop.box
    assert 95 <= x <= 98 and 26 <= y <= 30 and 5 <= w <= 10 and 61 <= h <= 67  # the stroke's own extent, not the rule's
    assert crop.ink.min() >= 0 and crop.ink.max() == 1 and crop.ink.shape[0] > 5 * crop.ink.shape[1]  # a tall thin stroke


def test_blank_ruled_and_squared_paper_has_no_digits_in_the_light_or_in_a_shadow():
    """The learned finder takes fainter ink than the OpenCV finder (learned_min_contrast): the network, not the
    ink's strength, tells a digit from a ruled line."""
    paper = np.full((120, 200), 225, np.uint8)
    assert crop_digit(paper, (88, 36, 26, 50), "auto") is None  # no ink at all
    finder = LearnedDigitFinder(BUNDLE / FINDER_FILE, DigitFinderSettings())
    for squared in (False, True):
        page = np.full((480, 640), 225, np.uint8)
        for y in range(20, 480, 32):
            cv2.line(page, (0, y), (639, y), 175, 2)  # a blue rule seen in grey: a quarter darker than the paper
        for x in range(20, 640, 32) if squared else ():
            cv2.line(page, (x, 0), (x, 479), 175, 2)
        shadowed = (page * np.linspace(0.35, 1, 640, dtype=np.float32)[None, :]).astype(np.uint8)
        assert len(finder.find(page)) == 0 and len(finder.find(shadowed)) == 0
