"""ONNX Runtime on the bundle's model.onnx (converted from the .tflite when the bundle was made, see
models/mnist/convert_onnx.py). ONNX tensors carry no quantization, so the converter records each int8
input's and output's scale and zero point in the model's metadata, under QUANTIZATION_KEY."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from agent.errors import ModelError, Reason
from agent.inference.backends.base import Backend, first_line, missing_package, spec_with_quantization, threads_label
from agent.settings import OnnxRuntimeSettings

QUANTIZATION_KEY = "edge_agent.quantization"  # JSON: {tensor name: [scale, zero point]}
DTYPES = {"tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int32)": "int32", "tensor(int64)": "int64"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    model_file = "model.onnx"
    requires = ("onnxruntime",)

    def __init__(self, model_path: Path, settings: OnnxRuntimeSettings):
        try:
            import onnxruntime
        except ImportError:
            raise missing_package(self.name, "'edge-agent[onnx]'") from None
        missing = [p for p in settings.providers if p not in onnxruntime.get_available_providers()]
        if missing:
            raise ModelError(f"model.backend.providers: {', '.join(missing)} not in this ONNX Runtime build (it has {', '.join(onnxruntime.get_available_providers())})", Reason.MODEL_FAILED)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings would reach the operator's terminal as noise
        # Worker threads sleep between frames instead of spinning: an agent at 30 fps is idle most of the time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = onnxruntime.InferenceSession(str(model_path), options, providers=list(settings.providers))
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types, all plain Exceptions
            raise ModelError(f"{model_path}: not a loadable ONNX model ({first_line(exc)}); re-convert or re-download it", Reason.INVALID_BUNDLE) from None
        try:
            quantization = {name: (float(s), int(z)) for name, (s, z) in json.loads(self._session.get_modelmeta().custom_metadata_map.get(QUANTIZATION_KEY, "{}")).items()}
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{model_path}: metadata {QUANTIZATION_KEY} is not {{name: [scale, zero point]}} ({exc}); re-convert the model", Reason.TENSOR_MISMATCH) from None
        self.inputs = [self._spec(t, quantization, model_path) for t in self._session.get_inputs()]
        self.outputs = [self._spec(t, quantization, model_path) for t in self._session.get_outputs()]
        self._input_names = [t.name for t in self._session.get_inputs()]
        self._output_names = [t.name for t in self._session.get_outputs()]
        provider = self._session.get_providers()[0].removesuffix("ExecutionProvider")
        self.device = f"{provider} (ONNX Runtime {onnxruntime.__version__}, {threads_label(settings.threads)})"

    @staticmethod
    def _spec(tensor, quantization: dict[str, tuple[float, int]], where: Path):
        if tensor.type not in DTYPES:
            raise ModelError(f"{where}: tensor {tensor.name!r} is {tensor.type}, which this backend does not feed ({', '.join(DTYPES)})", Reason.TENSOR_MISMATCH)
        shape = [d if isinstance(d, int) else -1 for d in tensor.shape]  # -1: a dimension the model leaves open
        return spec_with_quantization(tensor.name, shape, DTYPES[tensor.type], quantization, where)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._session.run(self._output_names, dict(zip(self._input_names, inputs)))

    def close(self) -> None:
        self._session = None
