"""The bundled sample video, end to end through real parts: OpenCV decodes the MJPG file, the digit finder
finds and normalises the digits, the shipped signed bundle classifies them on TFLite. The committed truth
file says what is really there; the figures are printed so a run shows how close to the line it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_digit_finder import iou

from agent.inference.model import load_model
from agent.inference.tasks.digit_finder import DigitFinder
from agent.settings import DEV_SIGNING_KEY, ModelSettings, TaskSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist" / "sample"
BUNDLE = ROOT / "models" / "mnist" / "bundle"
MNIST = ROOT / "models" / "mnist" / "data" / "mnist.npz"
MIN_FOUND_AND_RIGHT = 0.97
MAX_FALSE_SHARE = 0.02  # false digits, as a share of the true ones


def decode(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


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
    finder = DigitFinder()
    total = right = found = false = blank_false = 0
    wrong: list[str] = []
    for number, (frame, expected) in enumerate(zip(frames, truth["frames"])):
        result = finder.find(frame)
        labels = model.task.classify(model.backend.run, result.images).argmax(axis=1) if len(result) else []
        matched: set[int] = set()
        for digit in expected["digits"]:
            total += 1
            overlaps = [iou(digit["box"], box) for box in result.boxes]
            best = int(np.argmax(overlaps)) if overlaps else -1
            if best < 0 or overlaps[best] < 0.5 or best in matched:
                wrong.append(f"frame {number}: {digit['label']} at {digit['box']} not found")
                continue
            matched.add(best)
            found += 1
            if labels[best] == digit["label"]:
                right += 1
            else:
                wrong.append(f"frame {number}: {digit['label']} read as {labels[best]}")
        false += len(result) - len(matched)
        blank_false += len(result) if expected["blank"] else 0
    print(
        f"\nsample video: {total} digits, found {found / total:.2%}, found and right {right / total:.2%}, "
        f"false digits {false} (on blank frames {blank_false})"
    )
    print("\n".join(wrong[:20]))
    assert right / total >= MIN_FOUND_AND_RIGHT
    assert blank_false == 0
    assert false <= MAX_FALSE_SHARE * total


def test_generator_remakes_the_committed_video(tmp_path, truth, frames):
    """The committed video and truth are what the committed generator makes (same truth exactly; the
    pictures equal up to JPEG encoder differences between OpenCV builds)."""
    subprocess.run(
        [sys.executable, str(SAMPLE / "make_video.py"), "--seed", str(truth["seed"]), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert json.loads((tmp_path / "truth.json").read_text()) == truth
    remade = decode(tmp_path / "sample.avi")
    assert len(remade) == len(frames)
    worst = max(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) for a, b in zip(remade, frames))
    assert worst < 1.0
