"""The task interface: a frame becomes input tensors, output tensors become predictions.

A task is what a bundle's manifest asks for (its task id). It knows the model's input and output tensors as
the backend really has them, refuses a model whose tensors it cannot use, and owns the check that a model is
fit to serve (its golden set). Everything a task does per frame is pure numpy/OpenCV: no I/O.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from agent.bundles.bundle import OutputSpec
from agent.errors import ModelError, Reason
from agent.inference.backends.base import TensorSpec
from agent.messages import Prediction

Run = Callable[[Sequence[np.ndarray]], list[np.ndarray]]  # one backend invoke


@dataclass(frozen=True)
class Prepared:
    """What a task made of one frame: the inputs of each invoke, and what it needs to read their outputs."""

    invokes: list[list[np.ndarray]]
    context: Any = None


@dataclass(frozen=True)
class GoldenScore:
    """How a model did on its bundle's golden set, against the minimum its manifest sets."""

    metric: str
    value: float
    minimum: float

    @property
    def passed(self) -> bool:
        return self.value >= self.minimum


def check_tensor(name: str, claimed: OutputSpec, real: TensorSpec, where: str) -> None:
    """The model's real tensor must be what its manifest promised (shape, dtype, quantization)."""
    same = (
        tuple(claimed.shape) == real.shape
        and claimed.dtype == real.dtype
        and math.isclose(claimed.scale, real.scale, rel_tol=1e-6, abs_tol=1e-12)
        and claimed.zero_point == real.zero_point
    )
    if not same:
        said = f"{claimed.dtype}{list(claimed.shape)} scale {claimed.scale:g} zero point {claimed.zero_point}"
        has = f"{real.dtype}{list(real.shape)} scale {real.scale:g} zero point {real.zero_point}"
        raise ModelError(f"{where}: model {name} tensor is {has} but the manifest says {said}; re-pack the bundle from this model", Reason.TENSOR_MISMATCH)


class Task(ABC):
    """One kind of vision work (read digits, detect faces) on one loaded model."""

    name: ClassVar[str]
    reads_colour: bool = False  # a source left to choose (source.colour null) delivers colour frames when True

    @abstractmethod
    def prepare(self, image: np.ndarray) -> Prepared:
        """A grey or BGR frame -> the inputs of every invoke this frame needs (none when nothing is there)."""

    @abstractmethod
    def predictions(self, prepared: Prepared, outputs: list[list[np.ndarray]], score_threshold: float) -> list[Prediction]:
        """The raw outputs of each invoke -> predictions in frame pixels, those scoring at least the threshold."""

    @abstractmethod
    def golden(self, run: Run) -> GoldenScore:
        """Score the model, run through `run`, on the bundle's golden set."""
