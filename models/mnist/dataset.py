"""A dataset folder pulled with `edge-fleet data pull`, as MNIST-form training digits (for train.py --dataset).

Each reviewed row of labels.csv names a box in a captured frame and its label. The frame goes through the
agent's own DigitFinder, exactly as on the device, and each labelled box takes the digit the finder found
there (IoU 0.5), already in MNIST's form: what the model saw is what it is trained on. Rows whose label is
not a digit (a reviewer's "x", or blank) are skipped, as are captures kept as crops (the finder needs the
whole frame).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from agent.inference.tasks.digit_finder import DigitFinder
from agent.messages import Box
from agent.settings import DigitFinderSettings

MATCH_IOU = 0.5


def load_dataset(folder: Path, settings: DigitFinderSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from a pulled dataset folder."""
    folder = Path(folder)
    wanted: dict[str, list[tuple[Box, int]]] = defaultdict(list)
    with open(folder / "labels.csv", newline="") as stream:
        for row in csv.DictReader(stream):
            if row["label"].strip().isdigit() and row["x"] and row["image"] == f"{row['capture_id']}.jpg":  # a whole frame
                box = Box(x=int(row["x"]), y=int(row["y"]), w=int(row["w"]), h=int(row["h"]))
                wanted[row["image"]].append((box, int(row["label"])))
    finder = DigitFinder(settings)
    images, labels = [], []
    for name, boxes in sorted(wanted.items()):
        frame = cv2.imread(str(folder / "images" / name), cv2.IMREAD_GRAYSCALE)
        if frame is None:
            continue
        found = finder.find(frame)
        found_boxes = [Box(x=int(x), y=int(y), w=int(w), h=int(h)) for x, y, w, h in found.boxes]
        for box, label in boxes:
            overlaps = [box.iou(other) for other in found_boxes]
            if overlaps and max(overlaps) >= MATCH_IOU:
                images.append(np.rint(found.images[int(np.argmax(overlaps))] * 255).astype(np.uint8))
                labels.append(label)
    return np.array(images, np.uint8).reshape(-1, 28, 28), np.array(labels, np.int64)
