"""Digits read right and false digits, and per-frame cost (find + classify, decode excluded), of each digit
finder (OpenCV's and the bundle's learned one) on each sample clip: `sample.avi` and the hard one
(`sample_hard.avi`: ruled, squared and coloured paper, digits close together, deep shadows). Prints one line
per finder and clip, all measured in one sitting.

    .venv/bin/python tests/benchmarks/bench_finders.py [--rounds 3]

The finders take turns, `--rounds` times, and each keeps its quickest round: on a shared machine the
slowest rounds measure the neighbours.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clip_scoring import decode, read_clip  # noqa: E402

from agent.inference.model import load_model  # noqa: E402
from agent.inference.tasks.mnist_digits import make_finder  # noqa: E402
from agent.settings import DigitFinderSettings, ModelSettings, TaskSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "models" / "mnist" / "sample"
CLIPS = {"sample.avi": "truth.json", "sample_hard.avi": "truth_hard.json"}
FINDERS = ("opencv", "learned")  # tasks.mnist_digits.finder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    cv2.setNumThreads(1)
    model = load_model(ROOT / "models" / "mnist" / "bundle", ModelSettings(), TaskSettings())
    for clip, truth_file in CLIPS.items():
        truth = json.loads((SAMPLE / truth_file).read_text())
        frames = [cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) for frame in decode(SAMPLE / clip)]  # as the agent reads them
        finders = {name: make_finder(model.bundle, DigitFinderSettings(finder=name)) for name in FINDERS}
        best = {}
        for _ in range(rounds):
            for name, finder in finders.items():
                score = read_clip(frames, truth, finder, model)
                if name not in best or score.seconds < best[name].seconds:
                    best[name] = score
        for name, score in best.items():
            print(score.summary(f"{name} finder on {clip}"), flush=True)


if __name__ == "__main__":
    main()
