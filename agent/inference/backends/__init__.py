"""Backends by name (temporary shim until the backends registry lands)."""

from __future__ import annotations

from pathlib import Path

from agent.inference.backends.base import Backend, TensorSpec

__all__ = ["Backend", "TensorSpec", "open_backend"]


def open_backend(bundle_root: Path, files: dict[str, str], settings) -> Backend:
    from agent.inference.backends.litert import LiteRtBackend

    return LiteRtBackend(Path(bundle_root) / "model.tflite", settings)
