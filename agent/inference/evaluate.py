"""How good and how fast a model is: MNIST test accuracy, golden-set accuracy, invoke latency.

The training program records these figures in the manifest with the same functions that
`edge-agent model eval` and `bench` use on a device, so the two can be compared number for number.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from agent.errors import ModelError
from agent.inference.model import LoadedModel, load_model
from agent.inference.tasks.mnist_digits import MnistDigitsTask
from agent.settings import ModelSettings, TaskSettings

MNIST_PATH = Path(__file__).resolve().parents[2] / "models" / "mnist" / "data" / "mnist.npz"
MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"


def load_mnist(path: Path = MNIST_PATH) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test from the repo's MNIST copy, refused unless its sha256 is MNIST's."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"MNIST data {path}: cannot read it ({exc.strerror}); it ships in the repo at models/mnist/data/mnist.npz") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_SHA256:
        raise ModelError(f"MNIST data {path}: sha256 {digest[:12]}... is not MNIST's {MNIST_SHA256[:12]}...; restore models/mnist/data/mnist.npz")
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in ("x_train", "y_train", "x_test", "y_test")}


def accuracy(classify: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of uint8 images (already preprocessed) whose top score is their label."""
    scores = classify(images.astype(np.float32) / 255.0)
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def invoke_latency_us(run: Callable[[list[np.ndarray]], list[np.ndarray]], inputs: list[np.ndarray], repeats: int = 3000, warmup: int = 200, budget_s: float = 5.0) -> tuple[float, float]:
    """p50 and p99 of one invoke (set inputs, invoke, get outputs) through a backend's `run`, in us: `repeats`
    invokes after `warmup`, or as many as fit in `budget_s` each (at least 20), so a 50 ms detector is timed
    in seconds as a 100 us classifier is."""
    clock = time.perf_counter_ns
    deadline = clock() + budget_s * 1e9
    for done in range(warmup):
        run(inputs)
        if clock() > deadline and done >= 2:
            break
    times = []
    deadline = clock() + budget_s * 1e9
    while len(times) < repeats and (len(times) < 20 or clock() < deadline):
        start = clock()
        run(inputs)
        times.append(clock() - start)
    p50, p99 = np.percentile(times, [50, 99]) / 1000.0
    return float(p50), float(p99)


class Evaluation(BaseModel):
    """What `edge-agent model eval` prints (as JSON)."""

    model: str
    version: str
    backend: str
    device: str
    test_images: int
    test_accuracy: float
    recorded_int8_accuracy: float
    golden_images: int
    golden_accuracy: float
    min_golden_accuracy: float
    invoke_p50_us: float
    invoke_p99_us: float


def evaluate(model: LoadedModel, mnist_path: Path = MNIST_PATH, repeats: int = 3000) -> Evaluation:
    """Evaluate an MNIST digits model on the MNIST test set, its golden set, and for latency."""
    if not isinstance(model.task, MnistDigitsTask):
        raise ModelError(f"{model.bundle.root}: `model eval` measures MNIST digit models and this one is {model.manifest.task_id}; use `edge-agent bench`")
    mnist = load_mnist(mnist_path)
    manifest = model.manifest
    run = model.backend.run
    first = mnist["x_test"][:1].astype(np.float32) / 255.0
    p50, p99 = invoke_latency_us(run, [model.backend.inputs[0].quantize(first.reshape(model.backend.inputs[0].shape))], repeats=repeats)
    return Evaluation(
        model=manifest.name,
        version=manifest.version,
        backend=model.backend.name,
        device=model.backend.device,
        test_images=len(mnist["y_test"]),
        test_accuracy=accuracy(lambda images: model.task.classify(run, images), mnist["x_test"], mnist["y_test"]),
        recorded_int8_accuracy=manifest.metrics.int8_accuracy,
        golden_images=len(model.bundle.golden_y),
        golden_accuracy=model.golden().value,
        min_golden_accuracy=manifest.min_golden_accuracy,
        invoke_p50_us=p50,
        invoke_p99_us=p99,
    )


def evaluate_bundle(bundle_path: Path, settings: ModelSettings, tasks: TaskSettings, mnist_path: Path = MNIST_PATH) -> dict:
    """`edge-agent model eval`: load a bundle the way the agent does, then evaluate it (JSON-ready dict)."""
    return evaluate(load_model(bundle_path, settings, tasks), mnist_path).model_dump()
