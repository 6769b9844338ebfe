"""The task interface: a frame becomes input tensors, output tensors become predictions.

A task is what a bundle's manifest asks for (its task id). It knows the model's input and output tensors as
the backend really has them, refuses a model whose tensors it cannot use, and owns the check that a model is
fit to serve (its golden set). Everything a task does per frame is pure numpy/OpenCV: no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

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


class Task(ABC):
    """One kind of vision work (read digits, detect faces) on one loaded model."""

    name: ClassVar[str]

    @abstractmethod
    def prepare(self, image: np.ndarray) -> Prepared:
        """A grey or BGR frame -> the inputs of every invoke this frame needs (none when nothing is there)."""

    @abstractmethod
    def predictions(self, prepared: Prepared, outputs: list[list[np.ndarray]], score_threshold: float) -> list[Prediction]:
        """The raw outputs of each invoke -> predictions in frame pixels, those scoring at least the threshold."""

    @abstractmethod
    def golden(self, run: Run) -> GoldenScore:
        """Score the model, run through `run`, on the bundle's golden set."""
