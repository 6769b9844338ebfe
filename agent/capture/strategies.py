"""What is worth keeping: pure decisions on one frame's predictions, cheap enough for the pipeline thread.

Shadow disagreements are not decided here: the shadow evaluation reports them (agent.updates.shadow).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from agent.messages import Prediction
from agent.settings import CaptureSettings


def near_threshold(predictions: Sequence[Prediction], threshold: float, margin: float) -> bool:
    """A prediction that only just made the threshold: the model was unsure."""
    return any(p.score < threshold + margin for p in predictions)


class Strategies:
    """The strategies the settings turn on, asked in order; the first that keeps a frame names it."""

    def __init__(self, settings: CaptureSettings, rng: random.Random | None = None):
        self.margin = settings.near_threshold
        self.rate = settings.random_rate
        self.rng = rng or random.Random()

    def choose(self, predictions: Sequence[Prediction], threshold: float) -> str | None:
        if self.margin is not None and near_threshold(predictions, threshold, self.margin):
            return "near_threshold"
        if self.rate and self.rng.random() < self.rate:
            return "random"
        return None
