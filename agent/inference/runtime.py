"""TFLite interpreter backends behind one small interface.

ai-edge-litert is the default; tflite-runtime is the fallback for devices only it supports (it needs
numpy<2). Both expose the same `Interpreter` class, so one `Runtime` wraps either: it quantizes float
inputs with the model's own scale/zero point and dequantizes the scores, so callers never see int8.
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agent.errors import ModelError

BackendName = Literal["auto", "litert", "tflite-runtime"]

# Explicit registry (module that provides `Interpreter`), in the order `auto` tries them.
BACKENDS: dict[str, str] = {
    "litert": "ai_edge_litert.interpreter",
    "tflite-runtime": "tflite_runtime.interpreter",
}


@dataclass(frozen=True)
class TensorSpec:
    """What the model really has, read from the interpreter (compared with the manifest's claim)."""

    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Float values -> the tensor's dtype, using its own quantization (identity for float tensors)."""
        if self.dtype == "float32":
            return values.astype(np.float32, copy=False)
        info = np.iinfo(self.dtype)
        q = np.rint(values / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        if self.dtype == "float32":
            return values.astype(np.float32, copy=False)
        return (values.astype(np.float32) - self.zero_point) * self.scale


@contextmanager
def _native_stderr_silenced():
    """The TFLite C++ core prints 'INFO: Created ... XNNPACK delegate' on stderr at load. Errors are ours to
    report (one line), so its stderr is pointed at /dev/null for the few milliseconds of construction."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _spec(detail: dict) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


def available_backends() -> list[str]:
    """Backends importable in this environment, in preference order."""
    found = []
    for name, module in BACKENDS.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append(name)
    return found


def _interpreter_class(backend: BackendName):
    names = list(BACKENDS) if backend == "auto" else [backend]
    for name in names:
        try:
            return name, importlib.import_module(BACKENDS[name]).Interpreter
        except ImportError:
            continue
    wanted = "ai-edge-litert or tflite-runtime" if backend == "auto" else backend
    raise ModelError(f"no TFLite runtime installed: pip install {wanted.split(' or ')[0]} (runtime.backend={backend})")


class Runtime:
    """One loaded model. `invoke` runs one already-quantized input; `classify` runs float images."""

    def __init__(self, model_path: Path, backend: BackendName = "auto", num_threads: int = 1):
        self.backend, interpreter_class = _interpreter_class(backend)
        self.model_path = Path(model_path)
        try:
            with _native_stderr_silenced():
                self._interpreter = interpreter_class(model_path=str(self.model_path), num_threads=num_threads)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.model_path}: not a loadable TFLite model ({first_line}); re-export or re-download it") from None
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{self.model_path}: expected 1 input and 1 output tensor, found {len(inputs)} and {len(outputs)}")
        self.input = _spec(inputs[0])
        self.output = _spec(outputs[0])
        self._input_index = inputs[0]["index"]
        self._output_index = outputs[0]["index"]

    def invoke(self, quantized: np.ndarray) -> np.ndarray:
        """Run one input already in the input tensor's dtype and shape; returns the raw output tensor."""
        self._interpreter.set_tensor(self._input_index, quantized)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output_index)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Float images in [0, 1], shape (N, H, W) or (N, H, W, C) -> float scores (N, classes).

        The shipped models have batch size 1, so each image is one invoke (about 60 us for int8 MNIST).
        """
        shape = self.input.shape
        batch = images.reshape((len(images), *shape[1:]))
        quantized = self.input.quantize(batch)
        scores = np.empty((len(images), self.output.shape[-1]), dtype=np.float32)
        for i in range(len(images)):
            scores[i] = self.output.dequantize(self.invoke(quantized[i : i + 1])).reshape(-1)
        return scores
