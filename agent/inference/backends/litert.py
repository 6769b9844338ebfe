"""ai-edge-litert's Interpreter (the default backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from agent.errors import ModelError, Reason
from agent.inference.backends.base import Backend, TensorSpec


@contextmanager
def native_stderr_silenced():
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


def tensor_spec(detail: dict) -> TensorSpec:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(detail.get("name", ""), tuple(int(d) for d in detail["shape"]), np.dtype(detail["dtype"]).name, float(scale), int(zero_point))


class LiteRtBackend(Backend):
    name = "litert"

    def __init__(self, model_path: Path, settings):
        from ai_edge_litert.interpreter import Interpreter

        threads = getattr(settings, "threads", 1)
        try:
            with native_stderr_silenced():
                self._interpreter = Interpreter(model_path=str(model_path), num_threads=threads)
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{model_path}: not a loadable TFLite model ({first_line}); re-export or re-download it", Reason.NOT_TFLITE) from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        self.inputs = [tensor_spec(d) for d in inputs]
        self.outputs = [tensor_spec(d) for d in outputs]
        self._in = [d["index"] for d in inputs]
        self._out = [d["index"] for d in outputs]
        self.device = f"CPU ({threads} thread{'s' if threads > 1 else ''})"

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        interpreter = self._interpreter
        for index, value in zip(self._in, inputs):
            interpreter.set_tensor(index, value)
        interpreter.invoke()
        return [interpreter.get_tensor(index) for index in self._out]
