"""LiteRT's CompiledModel API: the model compiled once for an accelerator, run through tensor buffers.

On `cpu` it runs LiteRT's own CPU path (XNNPACK). On `npu` the model is compiled by a vendor compiler
plugin and run by that vendor's dispatch library; the ai-edge-litert wheel bundles Intel's, which links
against one exact OpenVINO release (libopenvino.so.2631 = openvino 2026.3.1, the `openvino` extra) and
can target an Intel NPU, GPU or, on any x86 machine, the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.errors import ModelError, Reason
from agent.inference.backends.base import (
    Backend,
    first_line,
    missing_package,
    native_stderr_silenced,
    spec_with_quantization,
    threads_label,
    tflite_quantization,
)
from agent.settings import LiteRtCompiledSettings

NPU_DISPATCH = "the Intel OpenVINO dispatch library bundled in ai-edge-litert"
NPU_FIX = "pip install 'edge-agent[openvino]' (openvino==2026.3.1, the release it links against) or set model.backend.accelerator: cpu"


class LiteRtCompiledBackend(Backend):
    name = "litert-compiled"
    requires = ("ai_edge_litert",)

    def __init__(self, model_path: Path, settings: LiteRtCompiledSettings):
        try:
            from ai_edge_litert import compiled_model as litert
            from ai_edge_litert.intel_openvino_options import IntelOpenVinoGraphBackend
        except ImportError:
            raise missing_package(self.name, "ai-edge-litert") from None
        npu = settings.accelerator == "npu"
        options = litert.Options(
            # NPU alone: a model the dispatch cannot take fails here, instead of quietly running on the CPU.
            hardware_accelerators=litert.HardwareAccelerator.NPU if npu else litert.HardwareAccelerator.CPU,
            cpu_options=litert.CpuOptions(num_threads=settings.threads),
            intel_openvino_options=litert.IntelOpenVinoOptions(graph_backend=IntelOpenVinoGraphBackend[settings.openvino_device]) if npu else None,
        )
        quantization = tflite_quantization(model_path)
        try:
            with native_stderr_silenced():
                self._model = litert.CompiledModel.from_file(str(model_path), options=options)
                self._input_buffers = self._model.create_input_buffers(0)
                self._output_buffers = self._model.create_output_buffers(0)
        except (ValueError, RuntimeError) as exc:
            if npu:
                raise ModelError(f"{model_path}: cannot compile it for {NPU_DISPATCH} on {settings.openvino_device} ({first_line(exc)}); {NPU_FIX}", Reason.MODEL_FAILED) from None
            raise ModelError(f"{model_path}: not a loadable TFLite model ({first_line(exc)}); re-export or re-download it", Reason.NOT_TFLITE) from None
        if npu and not self._model.is_fully_accelerated():
            raise ModelError(f"{model_path}: {NPU_DISPATCH} took only part of the model; {NPU_FIX}", Reason.MODEL_FAILED)
        signature = next(iter(self._model.get_signature_list()))
        self.inputs = [spec_with_quantization(d["name"], d["shape"], d["dtype"], quantization, model_path) for d in self._model.get_input_tensor_details(signature).values()]
        self.outputs = [spec_with_quantization(d["name"], d["shape"], d["dtype"], quantization, model_path) for d in self._model.get_output_tensor_details(signature).values()]
        self._output_sizes = [(int(np.prod(spec.shape)), np.dtype(spec.dtype), spec.shape) for spec in self.outputs]
        with native_stderr_silenced():  # LiteRT makes a second environment at the first run, and logs it
            self.run([np.zeros(spec.shape, spec.dtype) for spec in self.inputs])
        self.device = (
            f"Intel OpenVINO {settings.openvino_device} through LiteRT's NPU dispatch" if npu
            else f"CPU (LiteRT CompiledModel, XNNPACK, {threads_label(settings.threads)})"
        )

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        for buffer, value in zip(self._input_buffers, inputs):
            buffer.write(value)
        self._model.run_by_index(0, self._input_buffers, self._output_buffers)
        return [buffer.read(size, dtype).reshape(shape) for buffer, (size, dtype, shape) in zip(self._output_buffers, self._output_sizes)]

    def close(self) -> None:
        with native_stderr_silenced():  # LiteRT logs each accelerator it tears down
            self._input_buffers = self._output_buffers = []
            self._model = None
