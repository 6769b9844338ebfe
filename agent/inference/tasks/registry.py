"""Which preprocessing a model bundle asks for (its manifest's `input.preprocessing` id) -> the code that does it.

An explicit table: adding a model family means adding its preprocessor here and nowhere else.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from agent.errors import ModelError
from agent.inference.tasks.digit_finder import (
    MNIST_SIZE,
    DigitFinder,
    DigitFinderSettings,
)


class Found(Protocol):
    """What a preprocessor returns for one frame: model-ready inputs and where each came from."""

    boxes: np.ndarray  # (N, 4) x, y, w, h in frame pixels
    images: np.ndarray  # (N, ...) float32 inputs for the model

    def __len__(self) -> int: ...


class Preprocessor(Protocol):
    def find(self, frame: np.ndarray) -> Found: ...


# preprocessing id -> (factory, the input tensor shape it produces, batch of one).
PREPROCESSORS: dict[str, tuple[Callable[[DigitFinderSettings], Preprocessor], tuple[int, ...]]] = {
    "mnist-digits": (DigitFinder, (1, MNIST_SIZE, MNIST_SIZE, 1)),
}


def preprocessor_for(preprocessing_id: str, input_shape: tuple[int, ...], settings: DigitFinderSettings) -> Preprocessor:
    """The preprocessor a model asks for, once its input tensor is shown to be the image that preprocessor makes."""
    try:
        factory, produces = PREPROCESSORS[preprocessing_id]
    except KeyError:
        raise ModelError(f"model asks for preprocessing {preprocessing_id!r}, which this agent does not know ({', '.join(PREPROCESSORS)})") from None
    if tuple(input_shape) != produces:
        kind = "an image" if len(input_shape) == 4 else "not an image (NHWC)"
        raise ModelError(f"model input is {list(input_shape)}, {kind}, but {preprocessing_id} preprocessing makes {list(produces)}; use a model built for it")
    return factory(settings)
