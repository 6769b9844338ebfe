"""What every backend is: a model file opened on some chip, tensors in, tensors out.

A backend knows nothing of frames, labels or bundles. It reports its tensors as the runtime really has
them (names, shapes, dtypes, quantization), so the caller can check them against the manifest and turn
floats into the model's integers and back with the model's own scale and zero point.
"""

from __future__ import annotations

import os
import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel

from agent.errors import ModelError, Reason


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output, as the runtime really has it (compared with the manifest's claim)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "int8" | "uint8" | "float32" | ...
    scale: float  # 0.0 when not quantized
    zero_point: int  # 0 when not quantized

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """Float values -> the tensor's dtype, using its own quantization (identity for float tensors)."""
        if self.dtype == "float32":
            return values.astype(np.float32, copy=False)
        info = np.iinfo(self.dtype)
        q = np.rint(values / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, values: np.ndarray) -> np.ndarray:
        """The tensor's dtype -> float32 (identity for float tensors)."""
        if self.dtype == "float32":
            return values.astype(np.float32, copy=False)
        return (values.astype(np.float32) - self.zero_point) * self.scale


class Backend(ABC):
    """Runs one model file: tensors in, tensors out, on some chip.

    Subclasses are built as `Backend(model_path, settings)` with their own settings model from
    agent.settings, and raise ModelError (one line) when the file or the chip cannot be used.
    """

    name: ClassVar[str]  # registry key, e.g. "litert"
    model_file: ClassVar[str] = "model.tflite"  # the bundle file this backend reads
    requires: ClassVar[tuple[str, ...]] = ()  # top-level modules it imports: installed means available
    # A plugin's own settings model (pydantic); built-in backends have theirs in agent.settings.
    settings_type: ClassVar[type[BaseModel] | None] = None
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str  # what it runs on, e.g. "CPU (XNNPACK, 1 thread)"

    @abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One invoke: one array per input, in its spec's dtype and shape; the raw outputs (copies)."""

    def close(self) -> None:
        """Release the runtime's memory now rather than when the object is collected."""


def first_line(error: BaseException) -> str:
    """A runtime's multi-line exception as the one line our errors carry."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def missing_package(backend: str, install: str) -> ModelError:
    """The one error a backend gives when its runtime is not installed here."""
    return ModelError(f"backend {backend} needs a package not installed here: pip install {install}, or choose another model.backend", Reason.MODEL_FAILED)


def threads_label(threads: int) -> str:
    return f"{threads} thread" + ("" if threads == 1 else "s")


@contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Native runtimes print INFO lines on stderr while loading ('Created TensorFlow Lite XNNPACK delegate',
    LiteRT's accelerator registry). Errors are ours to report (one line), so the process's stderr is
    pointed at /dev/null for the few milliseconds of construction."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()  # what Python wrote meanwhile goes to /dev/null too
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tflite_quantization(model_path: Path) -> dict[str, tuple[float, int]]:
    """Scale and zero point of each input and output tensor of a .tflite file, by tensor name.

    Runtimes that take a .tflite but do not report its quantization (LiteRT's CompiledModel, OpenVINO)
    get it here, from the file's own flatbuffer, without loading a second runtime.
    """
    from ai_edge_litert import schema_py_generated as schema

    try:
        data = Path(model_path).read_bytes()
        if not schema.Model.ModelBufferHasIdentifier(data, 0):
            raise ValueError("no TFL3 identifier")
        model = schema.Model.GetRootAs(data, 0)
        graph = model.Subgraphs(0)
        found: dict[str, tuple[float, int]] = {}
        for index in [graph.Inputs(i) for i in range(graph.InputsLength())] + [graph.Outputs(i) for i in range(graph.OutputsLength())]:
            tensor = graph.Tensors(index)
            quantization = tensor.Quantization()
            scales = quantization.ScaleAsNumpy() if quantization is not None and quantization.ScaleLength() else None
            zero_points = quantization.ZeroPointAsNumpy() if quantization is not None and quantization.ZeroPointLength() else None
            found[tensor.Name().decode()] = (
                float(scales[0]) if scales is not None else 0.0,
                int(zero_points[0]) if zero_points is not None else 0,
            )
        return found
    except (OSError, AttributeError, IndexError, TypeError, ValueError, struct.error) as exc:  # flatbuffers raises plain errors on junk
        raise ModelError(f"{model_path}: not a readable TFLite model ({first_line(exc)}); re-export or re-download it", Reason.NOT_TFLITE) from None


def spec_with_quantization(name: str, shape: Sequence[int], dtype: Any, quantization: dict[str, tuple[float, int]], where: Path) -> TensorSpec:
    """A TensorSpec whose quantization is looked up by tensor name; an integer tensor the model records
    no quantization for is a ModelError (its numbers would mean nothing)."""
    dtype = np.dtype(dtype).name
    if name not in quantization and dtype not in ("float32", "float16"):
        raise ModelError(f"{where}: {dtype} tensor {name!r} has no recorded quantization (known: {', '.join(sorted(quantization)) or 'none'}); re-convert the model", Reason.TENSOR_MISMATCH)
    scale, zero_point = quantization.get(name, (0.0, 0))
    return TensorSpec(name=name, shape=tuple(int(d) for d in shape), dtype=dtype, scale=scale, zero_point=zero_point)
