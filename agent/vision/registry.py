"""Which preprocessing a model bundle asks for (its manifest's `input.preprocessing` id) -> the code that does it.

An explicit table: adding a model family means adding its preprocessor here and nowhere else.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from agent.errors import ModelError
from agent.vision.digits import DigitFinder, DigitFinderSettings


class Found(Protocol):
    """What a preprocessor returns for one frame: model-ready inputs and where each came from."""

    boxes: np.ndarray  # (N, 4) x, y, w, h in frame pixels
    images: np.ndarray  # (N, ...) float32 inputs for the model

    def __len__(self) -> int: ...


class Preprocessor(Protocol):
    def find(self, frame: np.ndarray) -> Found: ...


PREPROCESSORS: dict[str, Callable[[DigitFinderSettings], Preprocessor]] = {
    "mnist-digits": DigitFinder,
}


def preprocessor_for(preprocessing_id: str, settings: DigitFinderSettings) -> Preprocessor:
    try:
        factory = PREPROCESSORS[preprocessing_id]
    except KeyError:
        raise ModelError(f"model asks for preprocessing {preprocessing_id!r}, which this agent does not know ({', '.join(PREPROCESSORS)})") from None
    return factory(settings)
