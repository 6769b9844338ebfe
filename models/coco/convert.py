"""NanoDet as TFLite: the rebuilt TF.js graph (graph.py) with its six outputs joined into the two the agent's
`gfl-distance` decoding reads, converted float or fully int8 with a representative set.

The graph gives, for each of the three levels (strides 8, 16, 32), class scores [1, points, 80] (after a
sigmoid) and distance distributions [1, points, 44] (4 edges x 11 bins, logits). They are concatenated level
by level, finest first, into `scores` [1, 3549, 80] and `boxes` [1, 3549, 44]: one int8 scale per output,
and the decoder's anchor points in the same order. The score heads' sigmoids are applied after the
concatenation instead of before (the same values): an int8 sigmoid's output is fixed to 0..255/256, whereas a
concatenation's range is calibrated, and the highest score in the calibration images (0.88) would have
become the highest score the model can give.

Needs TensorFlow (the `train` extra); the agent never imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from models.coco import graph
from models.face.rebuild import to_tflite


def rebuild(folder: Path, classes: int) -> tuple[Callable, tuple[int, ...]]:
    """The graph in `folder` (nanodet.json and its weights) as a function image -> [scores, boxes]."""
    import tensorflow as tf

    run, input_shape, _ = graph.rebuild(Path(folder) / "nanodet.json", left_out=frozenset({"Sigmoid"}))
    sigmoids = [node["name"] for node in json.loads((Path(folder) / "nanodet.json").read_text())["modelTopology"]["node"] if node["op"] == "Sigmoid"]
    if len(sigmoids) != 3:
        raise ValueError(f"the graph has {len(sigmoids)} sigmoids, not one per level's score head")

    def joined(image):
        outputs = sorted(run(image), key=lambda out: -int(out.shape[1]))  # finest level (most points) first
        scores = [out for out in outputs if int(out.shape[2]) == classes]
        boxes = [out for out in outputs if int(out.shape[2]) != classes]
        if len(scores) != len(boxes) or [int(s.shape[1]) for s in scores] != [int(b.shape[1]) for b in boxes]:
            raise ValueError(f"outputs {[list(out.shape) for out in outputs]} are not scores and boxes per level")
        return [tf.sigmoid(tf.concat(scores, axis=1)), tf.concat(boxes, axis=1)]

    return joined, input_shape


def convert(folder: Path, classes: int, representative: Iterable[np.ndarray] | None = None) -> bytes:
    """The model as TFLite: float, or full int8 (weights, activations, input and outputs) when a
    representative set of float inputs is given."""
    run, input_shape = rebuild(folder, classes)
    return to_tflite(run, input_shape, representative)


def largest_difference(folder: Path, classes: int, model: bytes, image: np.ndarray) -> float:
    """The largest difference between a float TFLite `model`'s outputs and the TF.js graph's, run node by node as
    it is written (graph.rebuild's literal mode), on one float input image (H, W, 3)."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None].astype(np.float32))
    interpreter.invoke()
    mine = [interpreter.get_tensor(detail["index"]) for detail in interpreter.get_output_details()]
    literal, _, _ = graph.rebuild(Path(folder) / "nanodet.json", literal=True)
    outputs = sorted((out.numpy() for out in literal(tf.constant(image[None].astype(np.float32)))), key=lambda out: -out.shape[1])
    scores = np.concatenate([out for out in outputs if out.shape[2] == classes], axis=1)
    boxes = np.concatenate([out for out in outputs if out.shape[2] != classes], axis=1)
    by_shape = {out.shape: out for out in mine}
    return max(float(np.abs(by_shape[scores.shape] - scores).max()), float(np.abs(by_shape[boxes.shape] - boxes).max()))
