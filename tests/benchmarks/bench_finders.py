"""Digits read right and false digits, and per-frame cost (find + classify, decode excluded), of each digit
finder on each sample clip: `sample.avi` and the hard one (`sample_hard.avi`: ruled, squared and coloured
paper, digits close together, deep shadows). Prints one line per finder and clip.

    .venv/bin/python tests/benchmarks/bench_finders.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_scoring import decode, read_clip  # noqa: E402

from agent.inference.model import load_model  # noqa: E402
from agent.inference.tasks.digit_finder import DigitFinder  # noqa: E402
from agent.settings import ModelSettings, TaskSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "models" / "mnist" / "sample"
CLIPS = {"sample.avi": "truth.json", "sample_hard.avi": "truth_hard.json"}
FINDERS = {"opencv": DigitFinder}  # the learned finder (issue 14, item 3) joins here


def main() -> None:
    cv2.setNumThreads(1)
    model = load_model(ROOT / "models" / "mnist" / "bundle", ModelSettings(), TaskSettings())
    for clip, truth_file in CLIPS.items():
        truth = json.loads((SAMPLE / truth_file).read_text())
        frames = [cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) for frame in decode(SAMPLE / clip)]  # as the agent reads them
        for name, finder in FINDERS.items():
            print(read_clip(frames, truth, finder(), model).summary(f"{name} finder on {clip}"), flush=True)


if __name__ == "__main__":
    main()
