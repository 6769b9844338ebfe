"""The model in service, swapped between two frames."""

from __future__ import annotations

import threading

from agent.inference.model import LoadedModel


class ModelSlot:
    """Holds the model in use. A swap is one reference assignment: a frame reads `active` once, so it sees
    one model whole, and the next frame the new one. The update manager and the watchdog swap from their
    own threads; nobody else assigns it."""

    def __init__(self, model: LoadedModel):
        self._active = model
        self._lock = threading.Lock()

    @property
    def active(self) -> LoadedModel:
        return self._active

    def swap(self, model: LoadedModel) -> LoadedModel:
        """Put `model` in service from the next frame on; returns the one it replaced."""
        with self._lock:
            previous, self._active = self._active, model
        return previous
