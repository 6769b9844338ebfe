"""Reading a digit clip against its truth: how many digits a finder and a model read right, and how many
digits they made up. Shared by tests/test_sample_video.py and tests/benchmarks/bench_finders.py."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from test_digit_finder import iou


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


@dataclass
class ClipScore:
    total: int = 0
    found: int = 0
    right: int = 0
    false: int = 0  # found where no digit is
    blank_false: int = 0  # of those, on frames with no digit at all
    seconds: float = 0.0  # finding and classifying, all frames
    frames: int = 0
    wrong: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        return (
            f"{name}: {self.total} digits, found {self.found / self.total:.2%}, found and right {self.right / self.total:.2%}, "
            f"false digits {self.false} ({self.false / self.total:.2%}; on blank frames {self.blank_false}), "
            f"{self.seconds / self.frames * 1e3:.2f} ms per frame"
        )


def read_clip(frames: list[np.ndarray], truth: dict, finder, model) -> ClipScore:
    """Every frame through `finder` and the model's classifier; a digit counts as found when a box overlaps
    its true box by IoU >= 0.5 (each box claimed once), and as right when that box is read as its label."""
    score = ClipScore(frames=len(frames))
    for number, (frame, expected) in enumerate(zip(frames, truth["frames"])):
        start = time.perf_counter()
        result = finder.find(frame)
        labels = model.task.classify(model.backend.run, result.images).argmax(axis=1) if len(result) else []
        score.seconds += time.perf_counter() - start
        matched: set[int] = set()
        for digit in expected["digits"]:
            score.total += 1
            overlaps = [iou(digit["box"], box) for box in result.boxes]
            best = int(np.argmax(overlaps)) if overlaps else -1
            if best < 0 or overlaps[best] < 0.5 or best in matched:
                score.wrong.append(f"frame {number}: {digit['label']} at {digit['box']} not found")
                continue
            matched.add(best)
            score.found += 1
            if labels[best] == digit["label"]:
                score.right += 1
            else:
                score.wrong.append(f"frame {number}: {digit['label']} read as {labels[best]}")
        score.false += len(result) - len(matched)
        score.blank_false += len(result) if expected["blank"] else 0
    return score
