"""The model the agent serves: a verified bundle, the backend running its model file, and the task it serves.

`load_model` is the only way anything gets a model (the agent, updates, the watchdog, `model eval`, bench),
so nothing runs that was not signed, hashed and checked against what its manifest promises. Every refusal is
a ModelError carrying the reason code of the step that refused it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from agent.bundles.bundle import MODEL_FILE, Bundle, open_bundle
from agent.errors import ModelError, Reason
from agent.inference.backends import Backend, open_backend
from agent.inference.tasks import task_class
from agent.inference.tasks.base import GoldenScore, Task
from agent.messages import ModelRef, Prediction
from agent.settings import ModelSettings, TaskSettings


@dataclass(frozen=True)
class Inference:
    """One frame's predictions and the time each half took."""

    predictions: list[Prediction]
    prepare_s: float
    run_s: float


@dataclass
class LoadedModel:
    """A checked bundle, the backend running its model, and the task turning frames into predictions."""

    bundle: Bundle
    backend: Backend
    task: Task
    settings: ModelSettings
    task_settings: TaskSettings

    @property
    def manifest(self):
        return self.bundle.manifest

    @cached_property
    def ref(self) -> ModelRef:
        manifest = self.bundle.manifest
        return ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.files[MODEL_FILE], backend=self.backend.name, device=self.backend.device)

    def infer(self, image: np.ndarray, score_threshold: float) -> Inference:
        """One frame through the task and the backend."""
        start = time.perf_counter()
        prepared = self.task.prepare(image)
        prepared_at = time.perf_counter()
        outputs = [self.backend.run(inputs) for inputs in prepared.invokes]
        predictions = self.task.predictions(prepared, outputs, score_threshold)
        return Inference(predictions, prepared_at - start, time.perf_counter() - prepared_at)

    def golden(self) -> GoldenScore:
        """How this model does on its golden set, here, on this backend."""
        return self.task.golden(self.backend.run)

    def check_golden(self) -> GoldenScore:
        """The golden score, or a ModelError (GOLDEN_ACCURACY) when it is below the bundle's own minimum."""
        score = self.golden()
        if not score.passed:
            raise ModelError(
                f"{self.bundle.root}: golden {score.metric} {score.value:.4f} is below the bundle's minimum "
                f"{score.minimum:.4f}; this model is not fit to serve on this device",
                Reason.GOLDEN_ACCURACY,
            )
        return score

    def reloaded(self) -> LoadedModel:
        """The same bundle and task on a fresh backend (the watchdog's cure for an inference stage that hangs)."""
        backend = open_backend(self.bundle.root, self.bundle.manifest.files, self.settings.backend)
        return LoadedModel(self.bundle, backend, self.task, self.settings, self.task_settings)


def load_model(path: Path, settings: ModelSettings, task_settings: TaskSettings) -> LoadedModel:
    """Open and verify a bundle, run its model file on the configured backend, and build its task (which
    checks the real tensors against the manifest). Every refusal is a ModelError with its reason code."""
    bundle = open_bundle(
        path,
        trusted_keys=settings.trusted_keys,
        require_signature=settings.require_signature,
        max_bytes=settings.max_bundle_bytes,
    )
    manifest = bundle.manifest
    task_type = task_class(manifest.task_id)
    backend = open_backend(bundle.root, manifest.files, settings.backend)
    try:
        task = task_type(bundle, backend.inputs, backend.outputs, getattr(task_settings, manifest.task_id.replace("-", "_"), None))
    except BaseException:
        backend.close()
        raise
    return LoadedModel(bundle, backend, task, settings, task_settings)
