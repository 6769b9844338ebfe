"""Intel OpenVINO, which reads a .tflite directly (its TensorFlow Lite frontend) and compiles it for a
CPU, an Intel GPU or NPU. The int8 graph arrives as fake-quantize nodes, so the tensors' scale and zero
point are read from the .tflite file itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.errors import ModelError, Reason
from agent.inference.backends.base import Backend, first_line, missing_package, spec_with_quantization, threads_label, tflite_quantization
from agent.settings import OpenVinoSettings


class OpenVinoBackend(Backend):
    name = "openvino"
    requires = ("openvino",)

    def __init__(self, model_path: Path, settings: OpenVinoSettings):
        try:
            import openvino
        except ImportError:
            raise missing_package(self.name, "'edge-agent[openvino]'") from None
        quantization = tflite_quantization(model_path)
        core = openvino.Core()
        # One stream and latency first: frames come one at a time, each wanted as soon as possible.
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if settings.device == "CPU":
            config |= {"INFERENCE_NUM_THREADS": settings.threads, "NUM_STREAMS": 1}
        try:
            model = core.read_model(str(model_path))
        except RuntimeError as exc:
            raise ModelError(f"{model_path}: OpenVINO cannot read it ({first_line(exc)}); re-export or re-download it", Reason.NOT_TFLITE) from None
        try:
            self._compiled = core.compile_model(model, settings.device, config)
        except RuntimeError as exc:
            raise ModelError(f"model.backend.device {settings.device}: OpenVINO cannot compile for it ({first_line(exc)}); this machine has {', '.join(core.available_devices)}", Reason.MODEL_FAILED) from None
        self._request = self._compiled.create_infer_request()
        self.inputs = [spec_with_quantization(p.get_any_name(), p.get_shape(), p.get_element_type().to_dtype(), quantization, model_path) for p in self._compiled.inputs]
        self.outputs = [spec_with_quantization(p.get_any_name(), p.get_shape(), p.get_element_type().to_dtype(), quantization, model_path) for p in self._compiled.outputs]
        devices = ", ".join(self._compiled.get_property("EXECUTION_DEVICES"))
        version = openvino.__version__.split("-")[0]
        self.device = f"{devices} (OpenVINO {version}, {threads_label(settings.threads)})" if settings.device == "CPU" else f"{devices} (OpenVINO {version})"

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        result = self._request.infer(list(inputs))  # copies the outputs out (share_outputs=False)
        return [result[port] for port in self._compiled.outputs]

    def close(self) -> None:
        self._request = self._compiled = None
