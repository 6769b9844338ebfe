"""The bundled sample video, end to end through real parts: OpenCV decodes the MJPG file, the digit finder
finds and normalises the digits, the shipped signed bundle classifies them on TFLite. The committed truth
file says what is really there; the figures are printed so a run shows how close to the line it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clip_scoring import decode, read_clip

from agent.inference.model import load_model
from agent.inference.tasks.digit_finder import DigitFinder
from agent.settings import DEV_SIGNING_KEY, ModelSettings, TaskSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist" / "sample"
BUNDLE = ROOT / "models" / "mnist" / "bundle"
MNIST = ROOT / "models" / "mnist" / "data" / "mnist.npz"
MIN_FOUND_AND_RIGHT = 0.97
MAX_FALSE_SHARE = 0.02  # false digits, as a share of the true ones


@pytest.fixture(scope="module")
def truth() -> dict:
    return json.loads((SAMPLE / "truth.json").read_text())


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return decode(SAMPLE / "sample.avi")


def test_video_is_what_the_truth_describes(truth, frames):
    assert (SAMPLE / "sample.avi").stat().st_size < 6_000_000
    assert len(frames) == truth["frame_count"] == len(truth["frames"])
    assert all(frame.shape == (truth["height"], truth["width"], 3) for frame in frames)
    with np.load(MNIST) as data:
        labels = data["y_test"]
    counts = [len(f["digits"]) for f in truth["frames"]]
    assert set(counts) == {0, 1, 2, 3, 4}
    assert sum(f["blank"] for f in truth["frames"]) >= 10
    assert {f["surface"] for f in truth["frames"]} == {"paper", "board"}
    for f in truth["frames"]:
        assert f["blank"] == (not f["digits"])
        for digit in f["digits"]:
            x, y, w, h = digit["box"]
            assert digit["label"] == labels[digit["mnist_test_index"]]  # real MNIST test digits
            assert 0 < x and 0 < y and x + w < truth["width"] and y + h < truth["height"]
            assert 35 <= h <= 130


def test_finder_and_shipped_model_read_the_video(truth, frames):
    model = load_model(BUNDLE, ModelSettings(trusted_keys=[DEV_SIGNING_KEY]), TaskSettings())
    score = read_clip(frames, truth, DigitFinder(), model)
    print("\n" + score.summary("sample video"))
    print("\n".join(score.wrong[:20]))
    assert score.right / score.total >= MIN_FOUND_AND_RIGHT
    assert score.blank_false == 0
    assert score.false <= MAX_FALSE_SHARE * score.total


def test_hard_video_is_what_its_truth_describes():
    """The hard clip (`make_video.py --hard`): ruled, squared and coloured paper, digits close together, a
    shadow in every scene. The OpenCV finder's figures on it are printed by tests/benchmarks/bench_finders.py."""
    truth = json.loads((SAMPLE / "truth_hard.json").read_text())
    frames = decode(SAMPLE / "sample_hard.avi")
    assert (SAMPLE / "sample_hard.avi").stat().st_size < 5_000_000
    assert len(frames) == truth["frame_count"] == len(truth["frames"]) == 160
    assert {f["surface"] for f in truth["frames"]} == {"ruled", "grid", "coloured", "board"}
    assert sum(f["blank"] for f in truth["frames"]) == 20 and sum(len(f["digits"]) for f in truth["frames"]) == 350
    for f in truth["frames"]:
        for digit in f["digits"]:
            x, y, w, h = digit["box"]
            assert 0 < x and 0 < y and x + w < truth["width"] and y + h < truth["height"]


@pytest.mark.parametrize("name, truth_file, flags", [("sample", "truth.json", []), ("sample_hard", "truth_hard.json", ["--hard"])])
def test_generator_remakes_the_committed_video(name, truth_file, flags, tmp_path):
    """The committed videos and truths are what the committed generator makes (same truth exactly; the
    pictures equal up to JPEG encoder differences between OpenCV builds)."""
    truth = json.loads((SAMPLE / truth_file).read_text())
    subprocess.run(
        [sys.executable, str(SAMPLE / "make_video.py"), "--seed", str(truth["seed"]), "--out", str(tmp_path), *flags],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert json.loads((tmp_path / truth_file).read_text()) == truth
    frames, remade = decode(SAMPLE / f"{name}.avi"), decode(tmp_path / f"{name}.avi")
    assert len(remade) == len(frames)
    worst = max(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) for a, b in zip(remade, frames))
    assert worst < 1.0
