"""Train, quantize and package the shipped MNIST model: `python -m models.mnist.train --out DIR`.

Reproducible on a given machine: seeded numpy augmentation, Keras seeds, TensorFlow op determinism and
fixed thread counts. The result is a complete bundle directory (model.tflite, model.onnx, labels.txt, golden.npz,
manifest.json with measured metrics and provenance, manifest.sig when a signing key is given), built
and measured with the same agent code a device uses to check and run it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from agent.bundles.bundle import (
    GOLDEN_FILE,
    LABELS_FILE,
    MANIFEST,
    MODEL_FILE,
    SIGNATURE,
)
from agent.bundles.signing import DEFAULT_PRIVATE_KEY
from agent.errors import AgentError
from agent.fleet.packing import sign_bundle, write_manifest
from agent.inference.backends.litert import LiteRtBackend
from agent.inference.evaluate import MNIST_PATH, accuracy, invoke_latency_us, load_mnist
from agent.inference.tasks.mnist_digits import classify_digits, quantize_digits
from agent.settings import LiteRtSettings
from models.mnist.augment import augment_epoch

PROGRAM_DIR = Path(__file__).resolve().parent
LABELS = [str(d) for d in range(10)]
LIBRARIES = ("tensorflow-cpu", "keras", "numpy", "opencv-python-headless", "ai-edge-litert", "tf2onnx", "onnx")


def program_sha256() -> str:
    """sha256 over the programs that make the bundle: every source file under models/mnist (the classifier's
    training, the sample clips, the learned finder's training), by relative path and content, sorted."""
    digest = hashlib.sha256()
    for path in sorted(PROGRAM_DIR.rglob("*.py")):
        digest.update(path.relative_to(PROGRAM_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def created_time() -> str:
    """Now in UTC, or SOURCE_DATE_EPOCH when set (so the whole bundle can be rebuilt byte for byte)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def configure_determinism(seed: int, threads: int) -> None:
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train(x_train: np.ndarray, y_train: np.ndarray, *, epochs: int, batch_size: int, seed: int):
    """Fit the classifier; each epoch sees a freshly distorted copy of the training set."""
    import keras

    from models.mnist.network import build_classifier

    model = build_classifier()
    steps = epochs * int(np.ceil(len(x_train) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps, alpha=0.01)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        started = time.monotonic()
        order = rng.permutation(len(x_train))
        images = augment_epoch(x_train, rng)[order].astype(np.float32)[..., None] / 255.0
        history = model.fit(images, y_train[order], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        print(f"epoch {epoch + 1}/{epochs}: loss {history.history['loss'][-1]:.4f} "
              f"accuracy {history.history['accuracy'][-1]:.4f} ({time.monotonic() - started:.0f} s)", flush=True)
    return model


def to_int8_tflite(model, representative: np.ndarray) -> bytes:
    """Full-integer post-training quantization: int8 weights, activations, input and output, calibrated on
    `representative` (uint8 images). The classifier's and the learned finder's both."""
    import keras
    import tensorflow as tf

    image = keras.Input(batch_shape=(1, *model.input_shape[1:]), name="image")  # batch 1: one image per invoke
    converter = tf.lite.TFLiteConverter.from_keras_model(keras.Model(image, model(image, training=False)))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None, ..., None].astype(np.float32) / 255.0] for image in representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def golden_indices(y_test: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` test images of each digit, chosen by seed, in a fixed order."""
    rng = np.random.default_rng([seed, 1_000_000])
    picks = [rng.choice(np.flatnonzero(y_test == label), per_class, replace=False) for label in range(10)]
    return np.sort(np.concatenate(picks))


def library_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def build_bundle(args: argparse.Namespace) -> None:
    configure_determinism(args.seed, args.threads)
    mnist = load_mnist(args.data)
    x_test, y_test = mnist["x_test"], mnist["y_test"]
    x_train, y_train = with_datasets(*subset(mnist["x_train"], mnist["y_train"], args.train_images, args.seed), args.dataset, args.dataset_weight)
    model = train(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    float_accuracy = accuracy(lambda images: model.predict(images[..., None], batch_size=1000, verbose=0), x_test, y_test)

    rng = np.random.default_rng([args.seed, 2_000_000])
    representative = mnist["x_train"][rng.choice(len(mnist["x_train"]), args.calibration_images, replace=False)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from models.mnist.convert_onnx import ONNX_FILE, write_onnx  # it imports this module's provenance helpers

    for name in (MODEL_FILE, ONNX_FILE, LABELS_FILE, GOLDEN_FILE, MANIFEST, SIGNATURE):
        (out / name).unlink(missing_ok=True)
    (out / MODEL_FILE).write_bytes(to_int8_tflite(model, representative))
    write_onnx(out)  # the same int8 model for the onnxruntime backend
    (out / LABELS_FILE).write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    golden = golden_indices(y_test, args.golden_per_class, args.seed)
    np.savez_compressed(out / GOLDEN_FILE, x=x_test[golden], y=y_test[golden])

    backend = LiteRtBackend(out / MODEL_FILE, LiteRtSettings())
    spec_in, spec_out = backend.inputs[0], backend.outputs[0]
    classify = lambda images: classify_digits(backend.run, spec_in, spec_out, images)  # noqa: E731
    int8_accuracy = accuracy(classify, x_test, y_test)
    golden_accuracy = accuracy(classify, x_test[golden], y_test[golden])
    p50, p99 = invoke_latency_us(backend.run, [quantize_digits(spec_in, x_test[:1] / 255.0)])
    size = (out / MODEL_FILE).stat().st_size
    manifest = write_manifest(out, {
        "schema_version": 1,
        "name": args.name,
        "version": args.version,
        "task": "classification",
        "input": {**_tensor(spec_in), "layout": "NHWC", "colour": "gray", "preprocessing": "mnist-digits"},
        "output": _tensor(spec_out),
        "labels": LABELS,
        "metrics": {"float_accuracy": float_accuracy, "int8_accuracy": int8_accuracy, "size_bytes": size, "invoke_p50_us": round(p50, 1)},
        "min_golden_accuracy": round(np.floor((golden_accuracy - args.golden_margin) * 100) / 100, 2),
        "provenance": {
            "program_sha256": program_sha256(),
            "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest(),
            "libraries": library_versions(),
            "created": created_time(),
        },
    })
    signer = sign_bundle(out, args.key) if args.key else None
    print(f"float accuracy {float_accuracy:.4f}, int8 accuracy {int8_accuracy:.4f} "
          f"(drop {100 * (float_accuracy - int8_accuracy):.2f} points), golden {golden_accuracy:.4f} "
          f"(minimum {manifest.min_golden_accuracy}), model {size} bytes, invoke p50 {p50:.1f} us p99 {p99:.1f} us")
    print(f"model.tflite sha256 {manifest.files[MODEL_FILE]}; bundle {out} " + (f"signed by key {signer}" if signer else "UNSIGNED"))


def subset(x: np.ndarray, y: np.ndarray, count: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` of the training images, chosen by seed (all of them for None): a short run, e.g. a test of the loop."""
    if count is None or count >= len(x):
        return x, y
    pick = np.sort(np.random.default_rng([seed, 3_000_000]).choice(len(x), count, replace=False))
    return x[pick], y[pick]


def with_datasets(x: np.ndarray, y: np.ndarray, folders: list[Path], weight: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST plus the digits of pulled capture datasets (each repeated `weight` times: a few hundred
    reviewed frames would vanish among 60 000 digits otherwise)."""
    from models.mnist.dataset import load_dataset

    for folder in folders:
        images, labels = load_dataset(folder)
        print(f"dataset {folder}: {len(images)} labelled digits, weight {weight}", flush=True)
        x, y = np.concatenate([x, *[images] * weight]), np.concatenate([y, *[labels] * weight])
    return x, y


def _tensor(spec) -> dict:
    return {"shape": list(spec.shape), "dtype": spec.dtype, "scale": spec.scale, "zero_point": spec.zero_point}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.mnist.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROGRAM_DIR / "bundle", help="bundle directory to (re)write")
    parser.add_argument("--data", type=Path, default=MNIST_PATH)
    parser.add_argument("--key", type=Path, default=DEFAULT_PRIVATE_KEY if DEFAULT_PRIVATE_KEY.exists() else None,
                        help=f"Ed25519 private key to sign with (default {DEFAULT_PRIVATE_KEY} if it exists)")
    parser.add_argument("--name", default="mnist-int8")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads (fixed for reproducibility)")
    parser.add_argument("--calibration-images", type=int, default=1000, help="training images for int8 calibration")
    parser.add_argument("--golden-per-class", type=int, default=30)
    parser.add_argument("--golden-margin", type=float, default=0.02, help="min_golden_accuracy = measured minus this")
    parser.add_argument("--dataset", type=Path, action="append", default=[], help="a folder from `edge-fleet data pull` (labels.csv reviewed) to train on too (repeatable)")
    parser.add_argument("--dataset-weight", type=int, default=20, help="times each captured digit is repeated in the training set")
    parser.add_argument("--train-images", type=int, default=None, help="train on this many MNIST training images, chosen by seed (default: all 60 000)")
    return parser.parse_args(argv)


def run_program(step: Callable[[], object]) -> int:
    """Exit status of one of this folder's programs: a problem with the inputs is one line and code 2."""
    try:
        step()
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_program(lambda: build_bundle(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
