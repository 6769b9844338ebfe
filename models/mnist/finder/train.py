"""Train the learned digit finder on synthetic camera scenes and add it to an MNIST bundle as finder.tflite.

    python -m models.mnist.finder.train --bundle models/mnist/bundle --version 1.2.0 --key KEY

Scenes come from `scenes.py` (the sample clips' renderer, MNIST training digits, random conditions); the
network is `network.py`; the int8 model is calibrated on training frames. The bundle keeps its classifier
and gets finder.tflite under a new version, re-signed: the agent's mnist-digits task uses the finder when
the bundle carries one (setting tasks.mnist_digits.finder). Deterministic on a given machine (seeded scenes,
Keras seeds, op determinism, fixed threads).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from agent.bundles.bundle import MANIFEST, read_manifest
from agent.fleet.packing import sign_bundle, write_manifest
from agent.inference.evaluate import MNIST_PATH, load_mnist
from agent.inference.tasks.learned_finder import FINDER_FILE, SIZE_UNIT
from models.mnist.finder.network import GRID_STRIDE, build_finder
from models.mnist.finder.scenes import INPUT_SIZE, make_scenes
from models.mnist.train import (
    configure_determinism,
    created_time,
    library_versions,
    program_sha256,
    run_program,
    to_int8_tflite,
)

FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0  # CenterNet's focal loss exponents


def targets(boxes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: a Gaussian bump at each digit's centre cell (1 at the centre), and at that cell the box
    target: (1, offset x, offset y, log w / SIZE_UNIT, log h / SIZE_UNIT)."""
    width, height = INPUT_SIZE
    rows, cols = height // GRID_STRIDE, width // GRID_STRIDE
    heat = np.zeros((len(boxes), rows, cols, 1), np.float32)
    box = np.zeros((len(boxes), rows, cols, 5), np.float32)
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float32)
    for n, frame_boxes in enumerate(boxes):
        for x, y, w, h in frame_boxes:
            cx, cy = (x + w / 2) / GRID_STRIDE, (y + h / 2) / GRID_STRIDE
            col, row = min(int(cx), cols - 1), min(int(cy), rows - 1)
            sigma = max(0.5, (w + h) / 2 / GRID_STRIDE / 6)  # a neighbour 12% of a height away stays apart
            bump = np.exp(-((xs - col) ** 2 + (ys - row) ** 2) / (2 * sigma**2))
            heat[n, :, :, 0] = np.maximum(heat[n, :, :, 0], bump)
            box[n, row, col] = (1.0, cx - col, cy - row, np.log(max(w, 1) / SIZE_UNIT), np.log(max(h, 1) / SIZE_UNIT))
    return heat, box


def focal_loss(truth, predicted):
    """CenterNet's penalty-reduced focal loss, normalised by the number of digits in the batch."""
    import keras.ops as ops

    p = ops.clip(predicted, 1e-4, 1 - 1e-4)
    centre = ops.cast(truth >= 1.0, "float32")
    positive = centre * (1 - p) ** FOCAL_ALPHA * ops.log(p)
    negative = (1 - centre) * (1 - truth) ** FOCAL_BETA * p**FOCAL_ALPHA * ops.log(1 - p)
    return -ops.sum(positive + negative) / ops.maximum(ops.sum(centre), 1.0)


def box_loss(truth, predicted):
    """L1 on offset and log size at the centre cells only."""
    import keras.ops as ops

    mask = truth[..., :1]
    return ops.sum(mask * ops.abs(predicted - truth[..., 1:])) / ops.maximum(ops.sum(mask), 1.0)


def train(x: np.ndarray, boxes: list[np.ndarray], *, epochs: int, batch_size: int):
    import keras

    model = build_finder(INPUT_SIZE[1], INPUT_SIZE[0])
    steps = epochs * int(np.ceil(len(x) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps, alpha=0.02)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=[focal_loss, box_loss])
    heat, box = targets(boxes)
    images = x[..., None].astype(np.float32) / 255.0
    for epoch in range(epochs):
        started = time.monotonic()
        history = model.fit(images, [heat, box], batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        losses = {k: round(v[-1], 4) for k, v in history.history.items()}
        print(f"epoch {epoch + 1}/{epochs}: {losses} ({time.monotonic() - started:.0f} s)", flush=True)
    return model


def add_to_bundle(bundle: Path, finder: bytes, version: str, key: Path | None) -> str:
    """finder.tflite into the bundle under a new version (same classifier), re-signed when a key is given."""
    raw, _ = read_manifest(bundle, str(bundle))
    raw.pop("files", None)
    (bundle / FINDER_FILE).write_bytes(finder)
    raw["version"] = version
    raw["provenance"]["program_sha256"] = program_sha256()
    raw["provenance"]["created"] = created_time()
    raw["provenance"]["libraries"] = {**raw["provenance"]["libraries"], **library_versions()}
    manifest = write_manifest(bundle, raw)
    signer = sign_bundle(bundle, key) if key else None
    return f"{manifest.name} {manifest.version}: {', '.join(sorted(manifest.files))} in {bundle / MANIFEST}, " + (f"signed by key {signer}" if signer else "UNSIGNED")


def build(args: argparse.Namespace) -> None:
    configure_determinism(args.seed, args.threads)
    mnist = load_mnist(args.data)
    started = time.monotonic()
    x, boxes = make_scenes(range(args.scene_seed, args.scene_seed + args.scenes), mnist["x_train"], mnist["y_train"], args.processes)
    print(f"{len(x)} frames, {sum(map(len, boxes))} digits from {args.scenes} scenes ({time.monotonic() - started:.0f} s)", flush=True)
    model = train(x, boxes, epochs=args.epochs, batch_size=args.batch_size)
    representative = x[np.random.default_rng(args.scene_seed).choice(len(x), args.calibration_frames, replace=False)]
    print(add_to_bundle(args.bundle, to_int8_tflite(model, representative), args.version, args.key))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.mnist.finder.train", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the MNIST bundle directory to add the finder to (re-made in place)")
    parser.add_argument("--version", required=True, help="the re-made bundle's version")
    parser.add_argument("--key", type=Path, help="Ed25519 private key to sign with (unsigned without one)")
    parser.add_argument("--data", type=Path, default=MNIST_PATH)
    parser.add_argument("--scenes", type=int, default=1600, help="synthetic scenes (4 frames each)")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scene-seed", type=int, default=0, help="scene s is drawn from seed (s, 77): scenes scene-seed.. on")
    parser.add_argument("--seed", type=int, default=1, help="Keras and TensorFlow seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="processes drawing scenes")
    parser.add_argument("--calibration-frames", type=int, default=300)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_program(lambda: build(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
