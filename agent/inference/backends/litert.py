"""The TFLite interpreter (ai-edge-litert's, the reference backend): XNNPACK or builtin kernels, threads,
and external delegates (Edge TPU, GPU, Hexagon...) loaded from their shared library.

tflite-runtime has the same Interpreter API, so its backend is this class with another module.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from agent.errors import ModelError, Reason
from agent.inference.backends.base import Backend, TensorSpec, first_line, missing_package, native_stderr_silenced, threads_label
from agent.settings import DelegateSettings, InterpreterSettings


def interpreter_spec(detail: dict) -> TensorSpec:
    """A TFLite Interpreter's tensor details -> TensorSpec."""
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorSpec(
        name=detail["name"],
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]).name,
        scale=float(scale),
        zero_point=int(zero_point),
    )


class InterpreterBackend(Backend):
    """A TFLite `Interpreter` from `module`; both TFLite packages provide the same one."""

    module: ClassVar[str]
    install: ClassVar[str]  # what to pip install when `module` is missing

    def __init__(self, model_path: Path, settings: InterpreterSettings):
        try:
            runtime = importlib.import_module(self.module)
        except ImportError:
            raise missing_package(self.name, self.install) from None
        delegates = [_load_delegate(runtime, settings.delegate)] if settings.delegate else []
        resolver = runtime.OpResolverType.AUTO if settings.kernels == "xnnpack" else runtime.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            with native_stderr_silenced():
                self._interpreter = runtime.Interpreter(
                    model_path=str(model_path),
                    num_threads=settings.threads,
                    experimental_op_resolver_type=resolver,
                    experimental_delegates=delegates,
                )
                self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model_path}: not a loadable TFLite model ({first_line(exc)}); re-export or re-download it", Reason.NOT_TFLITE) from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        self.inputs, self.outputs = [interpreter_spec(d) for d in inputs], [interpreter_spec(d) for d in outputs]
        self._input_indices = [d["index"] for d in inputs]
        self._output_indices = [d["index"] for d in outputs]
        xnnpack = settings.kernels == "xnnpack" and self._delegated()
        cpu = f"CPU ({'XNNPACK' if xnnpack else 'builtin kernels'}, {threads_label(settings.threads)})"
        self.device = f"delegate {settings.delegate.library}, the rest on {cpu}" if settings.delegate else cpu

    def _delegated(self) -> bool:
        """Whether a delegate took any op: tflite-runtime 2.14's XNNPACK takes no int8 op, so such a model
        runs on the builtin kernels even when XNNPACK is asked for (the device says so)."""
        ops = getattr(self._interpreter, "_get_ops_details", lambda: [])()
        return any(op.get("op_name") == "DELEGATE" for op in ops)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        for index, value in zip(self._input_indices, inputs):
            self._interpreter.set_tensor(index, value)
        self._interpreter.invoke()
        return [self._interpreter.get_tensor(index) for index in self._output_indices]  # get_tensor copies

    def close(self) -> None:
        self._interpreter = None


def _load_delegate(runtime, delegate: DelegateSettings):
    """The delegate's library, loaded through the plugin API, or one line saying why not."""
    with native_stderr_silenced():
        try:
            return runtime.load_delegate(delegate.library, dict(delegate.options))
        except AttributeError:  # the library loaded but has no plugin entry point
            reason = "it has no tflite_plugin_create_delegate, so it is not a TFLite delegate plugin"
        except OSError as exc:  # dlopen: not found, wrong architecture
            reason = first_line(exc)
        except (ValueError, RuntimeError) as exc:
            # The delegate refused: "Failed to load delegate from X" then its own report.
            reason = " ".join(line.strip() for line in str(exc).strip().splitlines()[1:] if line.strip()) or first_line(exc)
        # The half-made Delegate sits in a reference cycle with that exception, and its __del__ prints a
        # traceback when collected: collect it now, while stderr is silenced.
        gc.collect()
    raise ModelError(
        f"model.backend.delegate.library {delegate.library}: cannot load the delegate ({reason}); "
        "install its library (Edge TPU: libedgetpu1-std) or fix the path",
        Reason.MODEL_FAILED,
    )


class LiteRtBackend(InterpreterBackend):
    name = "litert"
    module = "ai_edge_litert.interpreter"
    install = "ai-edge-litert"
    requires = ("ai_edge_litert",)
