"""The model the agent serves: a verified bundle plus a runtime whose real tensors match its manifest.

`load_model` is the only way the agent gets a model, so nothing runs that was not signed, hashed and
checked against what its manifest promises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.bundles.bundle import MAX_BUNDLE_BYTES, Bundle, OutputSpec, open_bundle
from agent.errors import ModelError
from agent.inference.evaluate import accuracy
from agent.inference.runtime import BackendName, Runtime, TensorSpec


def _check_spec(name: str, claimed: OutputSpec, real: TensorSpec, where: str) -> None:
    same = (
        tuple(claimed.shape) == real.shape
        and claimed.dtype == real.dtype
        and math.isclose(claimed.scale, real.scale, rel_tol=1e-6, abs_tol=1e-12)
        and claimed.zero_point == real.zero_point
    )
    if not same:
        said = f"{claimed.dtype}{list(claimed.shape)} scale {claimed.scale:g} zero point {claimed.zero_point}"
        has = f"{real.dtype}{list(real.shape)} scale {real.scale:g} zero point {real.zero_point}"
        raise ModelError(f"{where}: model {name} tensor is {has} but the manifest says {said}; re-pack the bundle from this model")


@dataclass
class LoadedModel:
    """A checked bundle and the runtime running its model."""

    bundle: Bundle
    runtime: Runtime
    num_threads: int

    @property
    def manifest(self):
        return self.bundle.manifest

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Float images in [0, 1] (already preprocessed) -> scores (N, len(labels))."""
        return self.runtime.classify(images)

    def golden_accuracy(self) -> float:
        """Fraction of the bundle's golden set this model gets right, here, on this runtime."""
        return accuracy(self.classify, self.bundle.golden_x, self.bundle.golden_y)

    def check_golden(self) -> float:
        """Golden accuracy, or a ModelError if it is below the bundle's own minimum (do not serve it)."""
        accuracy = self.golden_accuracy()
        if accuracy < self.manifest.min_golden_accuracy:
            raise ModelError(
                f"{self.bundle.root}: golden accuracy {accuracy:.4f} is below the bundle's minimum "
                f"{self.manifest.min_golden_accuracy:.4f}; this model is not fit to serve on this device"
            )
        return accuracy


def load_model(
    bundle_path: Path,
    *,
    trusted_keys: Sequence[Path],
    require_signature: bool = True,
    backend: BackendName = "auto",
    num_threads: int = 1,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> LoadedModel:
    """Open and verify a bundle, load its model, and check the real tensors against the manifest."""
    bundle = open_bundle(bundle_path, trusted_keys=trusted_keys, require_signature=require_signature, max_bytes=max_bytes)
    runtime = Runtime(bundle.model_path, backend=backend, num_threads=num_threads)
    where = str(bundle_path)
    _check_spec("input", bundle.manifest.input, runtime.input, where)
    _check_spec("output", bundle.manifest.output, runtime.output, where)
    if runtime.output.shape[-1] != len(bundle.labels):
        raise ModelError(f"{where}: model has {runtime.output.shape[-1]} outputs but the manifest has {len(bundle.labels)} labels; re-pack the bundle")
    return LoadedModel(bundle=bundle, runtime=runtime, num_threads=num_threads)
