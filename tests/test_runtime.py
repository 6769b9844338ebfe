"""Both TFLite backends on the real shipped model, and the real model on all 10,000 MNIST test digits
through the agent's own preprocessing (normalise_digit) and runtime.

The tflite-runtime backend needs numpy<2, so `make test` also runs this file in .venv-tflite with
`-m tflite_runtime`; in the main environment those cases are skipped as the backend is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MNIST, SHIPPED_BUNDLE

from agent.errors import ModelError
from agent.inference.backends import TensorSpec
from agent.inference.backends.litert import LiteRtBackend
from agent.inference.evaluate import load_mnist
from agent.inference.model import load_model
from agent.inference.tasks.digit_finder import normalise_digit
from agent.settings import LiteRtSettings, ModelSettings, TaskSettings


def available_backends() -> list[str]:
    found = []
    for name, module in (("litert", "ai_edge_litert"), ("tflite-runtime", "tflite_runtime")):
        try:
            __import__(module)
        except ImportError:
            continue
        found.append(name)
    return found


BACKENDS = [
    pytest.param("litert", marks=pytest.mark.skipif("litert" not in available_backends(), reason="ai-edge-litert not installed here")),
    pytest.param("tflite-runtime", marks=[pytest.mark.tflite_runtime, pytest.mark.skipif("tflite-runtime" not in available_backends(), reason="tflite-runtime runs in .venv-tflite (make test-tflite)")]),
]


@pytest.fixture(scope="module")
def mnist_test():
    data = load_mnist(MNIST)
    return data["x_test"], data["y_test"]


def shipped(backend: str):
    return load_model(SHIPPED_BUNDLE, ModelSettings(backend=backend), TaskSettings())


def classify(model, images):
    return model.task.classify(model.backend.run, images)


def test_quantize_round_trip_is_within_half_a_step():
    spec = TensorSpec("x", shape=(1, 4), dtype="int8", scale=1 / 255, zero_point=-128)
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    quantized = spec.quantize(values)
    assert quantized.dtype == np.int8 and quantized[0, 0] == -128 and quantized[0, 3] == 127
    assert np.max(np.abs(spec.dequantize(quantized) - values)) <= spec.scale / 2 + 1e-7


def test_quantize_saturates_instead_of_wrapping():
    spec = TensorSpec("x", shape=(1, 2), dtype="int8", scale=1 / 255, zero_point=-128)
    assert spec.quantize(np.array([[-1.0, 2.0]], np.float32)).tolist() == [[-128, 127]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_test_set_through_agent_preprocessing(backend, mnist_test):
    """At least the bundle's recorded int8 accuracy minus 0.5 point, through normalise_digit + Runtime."""
    x, y = mnist_test
    model = shipped(backend)
    assert model.backend.name == backend
    images = np.stack([normalise_digit(digit) for digit in x])
    predicted = np.argmax(classify(model, images), axis=1)
    accuracy = float(np.mean(predicted == y))
    print(f"{backend}: {accuracy:.4f} on 10,000 MNIST test digits (bundle records {model.manifest.metrics.int8_accuracy:.4f})")
    assert accuracy >= model.manifest.metrics.int8_accuracy - 0.005


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_set_passes_its_gate(backend):
    model = shipped(backend)
    assert model.check_golden().value >= model.manifest.min_golden_accuracy


def test_backends_agree_when_both_present():
    if len(available_backends()) < 2:
        pytest.skip("only one backend installed in this environment")
    images = shipped("litert").bundle.golden_x[:50].astype(np.float32) / 255
    a, b = classify(shipped("litert"), images), classify(shipped("tflite-runtime"), images)
    assert np.array_equal(np.argmax(a, 1), np.argmax(b, 1))


def test_empty_model_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not a loadable TFLite model"):
        (tmp_path / "empty.tflite").write_bytes(b"")
        LiteRtBackend(tmp_path / "empty.tflite", LiteRtSettings())
