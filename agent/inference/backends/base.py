"""The backend interface: one model file, tensors in, tensors out, on some chip."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the runtime really has it (compared with the manifest's claim)."""

    name: str
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


class Backend(ABC):
    """Runs one model file: tensors in, tensors out."""

    name: ClassVar[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    device: str

    @abstractmethod
    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One invoke: arrays in each input spec's dtype and shape; the raw outputs (copies)."""

    def close(self) -> None:
        """Release what the runtime holds."""
