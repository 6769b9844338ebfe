"""The update manager: one path from "here is a new model" to "it is serving" (or "the old one still is").

Every source of updates (an IoT Job document, a Greengrass component naming a bundle) goes through
`UpdateManager`: fetch -> verify (sha256, Ed25519 signature from a trusted key) -> validate (loads in the
runtime, tensors match the manifest, golden-set accuracy at or above the manifest's minimum) -> activate
(a ModelSlot swap between two frames) -> health window (the first frames run without error and with sane
scores) -> record it active in the store. Any failure leaves the old model serving and comes back as an
`Outcome` with a reason code a fleet dashboard can count and a one-line message a person can act on.

In shadow mode the verified candidate is not activated: it runs beside the serving model on sampled frames
(agent.updates.shadow) and stays installed in the store, so a later promotion (the same document in serve
mode, or `promote_at` reached) swaps it in through the same activation without downloading it again.

All of this runs on the caller's (update) thread; the pipeline thread only ever sees the swap. A model is
recorded active in the store only after its health window, so one that kills the process comes back, on
restart, as the model that served before it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from agent.bundles.bundle import (
    MANIFEST,
    read_manifest,
    sha256_file,
)
from agent.bundles.document import (
    ModelUpdate,
    ShadowPlan as RequestedShadow,
    Status,
    UpdateFailed,
    document_signed_bytes,
    parse_update,
    version_key,
)
from agent.bundles.fetch import DownloadError, Progress, fetch
from agent.bundles.signing import verify
from agent.bundles.store import ModelStore, check_name_version
from agent.errors import ModelError, Reason
from agent.inference.backends import Backend
from agent.inference.model import Inference, LoadedModel, load_model
from agent.messages import ShadowFigures
from agent.settings import (
    ModelSettings,
    Settings,
    ShadowSettings,
    TaskSettings,
    UpdateSettings,
)
from agent.updates.shadow import (
    ShadowDisagreement,
    ShadowPlan,
    ShadowRun,
    ShadowTap,
    status_details,
)

if TYPE_CHECKING:
    from agent.inference.pipeline import Pipeline
    from agent.inference.slot import ModelSlot

MAX_MANIFEST_BYTES = 1 << 20
LISTENER_STEP = 10  # percent: shadow figures go to listeners (metrics topic, /metrics) at each tenth of the run
log = logging.getLogger(__name__)


class Stage(StrEnum):
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    WATCHING = "watching"
    SHADOW = "shadow"


StageProgress = Callable[..., None]  # stage, percent 0..100[, details: dict[str, str] (shadow figures so far)]


class Outcome(BaseModel):
    """What an update came to: the job status, a reason code unless it succeeded, and one line for people."""

    model_config = ConfigDict(frozen=True)

    status: Status
    reason: Reason | None = None
    message: str
    name: str | None = None
    version: str | None = None
    shadow: ShadowFigures | None = None  # a shadow evaluation's final figures

    def status_details(self) -> dict[str, str]:
        """The Jobs `statusDetails` map (string values only, as IoT Jobs requires)."""
        details = {"message": self.message[:1000]}
        if self.reason:
            details["reason"] = self.reason.value
        if self.version:
            details["version"] = self.version
        if self.shadow:
            details |= {**status_details(self.shadow), "promoted": str(self.shadow.state == "promoted").lower()}
        return details


class HealthWatch:
    """The new model's first frames, seen from the pipeline thread (an observer, and the new model's backend
    reporting every output it makes).

    The pipeline thread only counts and records; the update thread waits on `done` and judges. A model that
    raises or gives NaN is answered for by the previous model on that frame, so no frame is lost while the
    update thread rolls back.
    """

    def __init__(self, frames: int):
        self.frames_wanted = frames
        self.frames = 0
        self.failure: str | None = None
        self.first_output: bytes | None = None
        self.outputs = 0
        self.varied = False
        self.open = False
        self.done = threading.Event()

    def start(self) -> None:
        self.frames, self.failure, self.first_output, self.outputs, self.varied = 0, None, None, 0, False
        self.done.clear()
        self.open = True

    def on_frame(self, frame, result, latency_ms: float) -> None:
        if self.open:
            self.frames += 1
            if self.frames >= self.frames_wanted:
                self.done.set()

    def record(self, outputs: list[np.ndarray]) -> str | None:
        """Note one invoke's outputs; returns why they are unusable, or None."""
        if not all(np.isfinite(output).all() for output in outputs if output.dtype.kind == "f"):
            return "the model produced NaN or infinite outputs"
        seen = b"".join(output.tobytes() for output in outputs)
        if self.first_output is None:
            self.first_output = seen
        elif seen != self.first_output:
            self.varied = True
        self.outputs += 1
        return None

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        self.done.set()

    def verdict(self) -> str | None:
        """Why the window failed, or None if the model served cleanly."""
        self.open = False
        if self.failure:
            return self.failure
        if self.outputs >= 2 and not self.varied:
            return f"the model gave identical outputs for all {self.outputs} inputs it saw (constant output)"
        return None


class ShadowFailed(UpdateFailed):
    """The candidate crashed, stalled or saw no frame in shadow; `figures` is how far it got."""

    def __init__(self, reason: Reason, message: str, figures: ShadowFigures):
        super().__init__(reason, message)
        self.figures = figures


class UnusableOutput(Exception):
    """The new model's output failed the health watch's check (NaN, infinity)."""


class WatchedBackend(Backend):
    """The new model's backend during its health window: every output is shown to the watch first."""

    def __init__(self, backend: Backend, watch: HealthWatch):
        self.name, self.inputs, self.outputs, self.device = backend.name, backend.inputs, backend.outputs, backend.device
        self._backend, self._watch = backend, watch

    def run(self, inputs):
        outputs = self._backend.run(inputs)
        problem = self._watch.record(outputs)
        if problem:
            raise UnusableOutput(problem)
        return outputs


@dataclasses.dataclass
class WatchedModel(LoadedModel):
    """The new model in its health window: a frame it fails on is answered by the model it replaced."""

    fallback: LoadedModel | None = None
    watch: HealthWatch | None = None

    def infer(self, image: np.ndarray, score_threshold: float) -> Inference:
        try:
            return super().infer(image, score_threshold)
        except Exception as exc:  # noqa: BLE001 -- any fault of the new model must not stop the pipeline
            self.watch.fail(str(exc) if isinstance(exc, UnusableOutput) else f"the model raised {type(exc).__name__} while serving: {exc}")
            return self.fallback.infer(image, score_threshold)


class UpdateManager:
    """Applies updates one at a time to the model serving in `slot`, keeping versions in `store`."""

    def __init__(
        self,
        settings: UpdateSettings,
        model: ModelSettings,
        tasks: TaskSettings,
        slot: ModelSlot,
        listeners: Sequence[Callable[[Outcome | ShadowFigures | ShadowDisagreement], None]] = (),
        shadow: ShadowSettings = ShadowSettings(),
    ):
        self.settings = settings
        self.shadow_settings = shadow
        self.listeners = list(listeners)  # told every outcome, shadow figures and disagreements (metrics, status, capture)
        self.slot = slot
        self.store = ModelStore(settings.store, keep=settings.keep)
        self.watch = HealthWatch(settings.health_frames)
        self.shadow_tap = ShadowTap(lambda: model.score_threshold)
        self._lock = threading.Lock()
        self.configure(model, tasks)

    @classmethod
    def serving(cls, settings: Settings, pipeline: Pipeline) -> UpdateManager:
        """The update manager of a running pipeline: it swaps the pipeline's slot, watches its frames (health
        window, shadow evaluation), tells the pipeline's update listeners every outcome and shadow figures,
        and publishes shadow figures on the metrics topic."""
        manager = cls(settings.updates, settings.model, settings.tasks, pipeline.slot, [pipeline.report_update, publish_shadow_figures(pipeline)], settings.shadow)
        manager.shadow_tap = ShadowTap(lambda: pipeline.tuning.score_threshold)
        pipeline.add_observer(manager.watch)
        pipeline.add_observer(manager.shadow_tap)
        return manager

    def configure(self, model: ModelSettings, tasks: TaskSettings, shadow: ShadowSettings | None = None) -> None:
        """The model settings (trusted keys, backend), task settings and shadow settings the next update uses."""
        require_signature = model.require_signature and not self.settings.allow_unsigned
        self.model_settings = model.model_copy(update={"require_signature": require_signature})
        self.task_settings = tasks
        if shadow is not None:
            self.shadow_settings = shadow

    # -- entry points ------------------------------------------------------------------------------

    def apply(self, document: Any, progress: StageProgress | None = None) -> Outcome:
        """Apply a job document (a dict, as IoT Jobs delivers it). Never raises for a bad update."""
        try:
            update = parse_update(document)
        except UpdateFailed as failed:
            return self._told(Outcome(status=failed.status, reason=failed.reason, message=str(failed)))
        shadow = self.shadow_plan(update.shadow) if update.mode == "shadow" else None
        return self._told(self._run(update.name, update.version, lambda report, tmp: self._download(update, report, tmp), progress, update, shadow))

    def shadow_plan(self, requested: RequestedShadow | None) -> ShadowPlan:
        """A job document's shadow options over the device's shadow settings."""
        chosen = self.shadow_settings.model_dump(exclude={"candidate"}) | (requested.model_dump(exclude_none=True) if requested else {})
        return ShadowPlan(**chosen)

    def apply_bundle(self, path: Path, progress: StageProgress | None = None, shadow: ShadowPlan | None = None) -> Outcome:
        """Apply a bundle already on disk (directory or .zip), e.g. a Greengrass model component's artifact;
        with `shadow`, evaluate it beside the serving model instead of serving it."""
        path = Path(path)
        try:
            raw = read_manifest(path, str(path))[0] if path.is_dir() else _zip_manifest(path)
            name, version = raw.get("name"), raw.get("version")
            check_name_version(name, version)
        except ModelError as exc:
            return self._told(Outcome(status=Status.FAILED, reason=Reason.INVALID_BUNDLE, message=str(exc)))
        return self._told(self._run(name, version, lambda report, tmp: path, progress, None, shadow))

    def _told(self, event):
        """Tell every listener an outcome, shadow figures, or a shadow disagreement (from the candidate's thread)."""
        for listener in self.listeners:
            listener(event)
        return event

    def check_downgrade(self, update: ModelUpdate) -> None:
        """REJECTED for an older version than the one serving, unless the document or settings allow it."""
        serving = self.slot.active.ref
        if update.name != serving.name or update.allow_downgrade or self.settings.allow_downgrade:
            return
        if version_key(update.version) < version_key(serving.version):
            raise UpdateFailed(
                Reason.DOWNGRADE_REFUSED,
                f"{update.name} {update.version} is older than {serving.version} serving now; set allow_downgrade in the job document to roll back on purpose",
                Status.REJECTED,
            )

    # -- the steps ------------------------------------------------------------------------------------

    def _run(self, name: str, version: str, obtain: Callable[[Progress, Path], Path], progress: StageProgress | None, update: ModelUpdate | None, shadow: ShadowPlan | None = None) -> Outcome:
        report = progress or (lambda stage, percent, details=None: None)
        with self._lock:
            serving = self.slot.active.ref
            if (serving.name, serving.version) == (name, version):
                return Outcome(status=Status.SUCCEEDED, message=f"{name} {version} is already serving", name=name, version=version)
            figures = None
            try:
                if update is not None:
                    self.check_downgrade(update)
                    self._verify_document(update)
                installed = self._stored(update)
                if installed is None:
                    with tempfile.TemporaryDirectory(prefix="edge-update-", dir=self._downloads()) as tmp:
                        artifact = obtain(lambda fraction: report(Stage.DOWNLOADING, int(fraction * 100)), Path(tmp))
                        report(Stage.VERIFYING, 0)
                        if update is not None:
                            self._check_artifact(update, artifact)
                        installed = self._install(artifact, name, version, update.sha256 if update else None)
                try:
                    model = self._validate(installed, name, version, report)
                    if shadow is not None:
                        figures = self._shadow(model, shadow, report)
                        if shadow.promote_at is None or figures.agreement is None or figures.agreement < shadow.promote_at:
                            model.backend.close()  # evaluated; it stays in the store, not in memory
                            return Outcome(status=Status.SUCCEEDED, message=_judged(figures, shadow), name=name, version=version, shadow=figures)
                        log.info("shadow: %s %s agrees %.4f >= %.4f: promoting it", name, version, figures.agreement, shadow.promote_at)
                    self._activate(model, report)
                except BaseException:
                    self.store.discard(name, version)
                    raise
                self.store.prune()
            except UpdateFailed as failed:
                return Outcome(status=failed.status, reason=failed.reason, message=str(failed), name=name, version=version, shadow=getattr(failed, "figures", figures))
            except Exception as exc:  # noqa: BLE001 -- a fault of ours must still end the job, not hang it
                log.exception("update %s %s failed unexpectedly", name, version)
                return Outcome(status=Status.FAILED, reason=Reason.INTERNAL_ERROR, message=f"agent fault while updating: {type(exc).__name__}: {exc}", name=name, version=version)
            if figures is not None:
                promoted = figures.model_copy(update={"state": "promoted"})
                self._told(promoted)
                return Outcome(status=Status.SUCCEEDED, message=f"{_judged(figures, shadow)}; promoted: {name} {version} is serving", name=name, version=version, shadow=promoted)
            return Outcome(status=Status.SUCCEEDED, message=f"{name} {version} is serving", name=name, version=version)

    def _stored(self, update: ModelUpdate | None) -> Path | None:
        """The store's copy of the document's artifact, installed earlier (a shadow candidate being promoted):
        no second download. Its signature and hashes are checked again when it is loaded."""
        if update is None or not self.store.path(update.name, update.version).is_dir():
            return None
        if self.store.stored(update.name, update.version).artifact_sha256 != update.sha256:
            return None
        log.info("update %s %s: verified copy found in the model store; not downloading it again", update.name, update.version)
        return self.store.path(update.name, update.version)

    def _shadow(self, candidate: LoadedModel, plan: ShadowPlan, report: StageProgress) -> ShadowFigures:
        """Run the candidate beside the serving model until the plan ends it; UpdateFailed if it crashed or stalled."""
        manifest = candidate.manifest
        log.info("shadow: evaluating %s %s on every %s frame for up to %d frames or %g s", manifest.name, manifest.version, _nth(plan.every_nth), plan.frames, plan.seconds)
        run = ShadowRun(candidate, plan, on_disagreement=self._told)  # data capture keeps those frames
        told = [-1]

        def progress(figures: ShadowFigures, percent: int) -> None:
            report(Stage.SHADOW, percent, status_details(figures))
            if percent // LISTENER_STEP != told[0]:  # metrics topic and /metrics: every tenth of the way
                told[0] = percent // LISTENER_STEP
                self._told(figures)

        self.shadow_tap.run = run
        try:
            figures = run.run(progress)
        finally:
            self.shadow_tap.run = None
        report(Stage.SHADOW, 100, status_details(figures))
        self._told(figures)
        if run.failure is not None:
            reason, why = run.failure
            raise ShadowFailed(reason, f"{manifest.name} {manifest.version} failed in shadow after {figures.frames} frames: {why}", figures)
        return figures

    def _downloads(self) -> Path:
        path = self.store.root / ".downloads"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _download(self, update: ModelUpdate, report: Progress, tmp: Path) -> Path:
        try:
            return fetch(update.url, tmp / "bundle.zip", self.settings.download, expected_size=update.size, progress=report)
        except DownloadError as exc:
            raise UpdateFailed(Reason(exc.code), str(exc)) from None

    def _verify_document(self, update: ModelUpdate) -> None:
        """A signed document is checked before anything is downloaded (a forged one costs no bandwidth)."""
        if update.signature is None:
            return
        message = document_signed_bytes(update.name, update.version, update.sha256, update.size)
        self._check_signature(message, update.signature.model_dump_json().encode(), "job document")

    def _check_artifact(self, update: ModelUpdate, artifact: Path) -> None:
        digest = sha256_file(artifact)
        if digest != update.sha256:
            raise UpdateFailed(Reason.SHA256_MISMATCH, f"downloaded bundle has sha256 {digest[:16]}... but the job document says {update.sha256[:16]}...; the artifact was corrupted or replaced")

    def _check_signature(self, message: bytes, signature_bytes: bytes, where: str) -> None:
        """Ed25519 check with the failure named: untrusted key and bad signature are different problems."""
        try:
            verify(message, signature_bytes, self.model_settings.trusted_keys, where)
        except ModelError as exc:
            raise UpdateFailed(exc.reason, str(exc)) from None

    def _install(self, artifact: Path, name: str, version: str, artifact_sha256: str | None) -> Path:
        try:
            return self.store.install(artifact, name, version, artifact_sha256, max_bytes=self.model_settings.max_bundle_bytes)
        except ModelError as exc:
            raise UpdateFailed(Reason.INVALID_BUNDLE, str(exc)) from None
        except OSError as exc:
            raise UpdateFailed(Reason.STORE_FAILED, f"model store {self.store.root}: cannot install ({exc.strerror}); free disk space or fix updates.store") from None

    def _validate(self, root: Path, name: str, version: str, report: StageProgress) -> LoadedModel:
        """Signature, hashes, loadability, tensors, golden set: loaded once, each refusal named by its reason."""
        model = _step(load_model, root, self.model_settings, self.task_settings)
        manifest = model.manifest
        if (manifest.name, manifest.version) != (name, version):
            raise UpdateFailed(Reason.NAME_MISMATCH, f"update names {name} {version} but the bundle is {manifest.name} {manifest.version}; fix the job document or the bundle")
        report(Stage.VERIFYING, 100)
        report(Stage.VALIDATING, 50)
        _step(model.check_golden)
        report(Stage.VALIDATING, 100)
        return model

    def _activate(self, model: LoadedModel, report: StageProgress) -> None:
        """Swap between two frames, watch the first frames, then keep it (store) or swap the old one back."""
        report(Stage.ACTIVATING, 0)
        previous = self.slot.active
        watched = WatchedModel(model.bundle, WatchedBackend(model.backend, self.watch), model.task, model.settings, model.task_settings, fallback=previous, watch=self.watch)
        self.watch.start()
        self.slot.swap(watched)
        report(Stage.WATCHING, 0)
        self.watch.done.wait(self.settings.health_timeout_s)
        problem = self.watch.verdict()
        if problem:
            self.slot.swap(previous)
            raise UpdateFailed(Reason.HEALTH_CHECK_FAILED, f"{model.manifest.name} {model.manifest.version} rolled back after {self.watch.frames} frames: {problem}")
        self.slot.swap(model)  # the same model without the watch
        report(Stage.WATCHING, 100)
        manifest = model.manifest
        try:
            self.store.activate(manifest.name, manifest.version)
        except (ModelError, OSError) as exc:
            self.slot.swap(previous)
            raise UpdateFailed(Reason.STORE_FAILED, f"could not record {manifest.name} {manifest.version} as active ({exc}); the previous model is serving") from None
        report(Stage.ACTIVATING, 100)

    # -- start-up ------------------------------------------------------------------------------------

    def restore(self) -> LoadedModel | None:
        """Serve the store's active model (falling back to its previous one) instead of the configured bundle.

        Call before the pipeline's first frame. Returns what was replaced, or None if the store has nothing
        usable (then the configured bundle keeps serving).
        """
        state = self.store.state()
        for ref in (state.active, state.previous):
            if ref is None:
                continue
            try:
                model = load_model(self.store.path(ref.name, ref.version), self.model_settings, self.task_settings)
            except ModelError:
                continue
            if ref != state.active:
                self.store.rollback()
            return self.slot.swap(model)
        return None


def _nth(n: int) -> str:
    return {1: "", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _judged(figures: ShadowFigures, plan: ShadowPlan) -> str:
    """One line on a finished shadow evaluation."""
    agreement = "no agreement figure" if figures.agreement is None else f"agreement {figures.agreement:.4f}"
    line = f"{figures.candidate.name} {figures.candidate.version} in shadow: {agreement} over {figures.frames} frames"
    if plan.promote_at is not None and (figures.agreement is None or figures.agreement < plan.promote_at):
        line += f", below promote_at {plan.promote_at:g}: not promoted; it stays in the model store for `edge-fleet model promote`"
    return line


def publish_shadow_figures(pipeline: Pipeline) -> Callable[[Outcome | ShadowFigures], None]:
    """A listener putting shadow figures on the metrics topic, in a metrics message the pipeline thread makes
    between two frames (its statistics are the pipeline thread's own), and in the retained status."""
    waiting: queue.SimpleQueue[ShadowFigures] = queue.SimpleQueue()

    def publish() -> None:
        while not waiting.empty():
            figures = waiting.get()
            transport = pipeline.transport.stats()
            snapshot = pipeline.metrics(pipeline.tuning.metrics_interval_s, transport.queued, transport.dropped)
            pipeline.transport.publish(snapshot.model_copy(update={"shadow": figures}))
            pipeline.announce_shadow(figures)

    pipeline.between_frames(publish)
    return lambda event: waiting.put(event) if isinstance(event, ShadowFigures) else None


def _zip_manifest(path: Path) -> dict:
    """The (not yet trusted) manifest inside a bundle .zip: only its name and version are used, to place it."""
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.getinfo(MANIFEST).file_size > MAX_MANIFEST_BYTES:
                raise ModelError(f"{path}: {MANIFEST} is over {MAX_MANIFEST_BYTES} bytes; this is not a bundle")
            return json.loads(archive.read(MANIFEST))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path}: not a bundle .zip with a {MANIFEST} ({exc}); point the component at a bundle") from None


def _step(action: Callable, *args):
    """Run one validation step; its ModelError becomes UpdateFailed with the error's own reason, and the
    backend failing to run the model (RuntimeError/ValueError from the runtime) becomes MODEL_FAILED."""
    try:
        return action(*args)
    except ModelError as exc:
        raise UpdateFailed(exc.reason, str(exc)) from None
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UpdateFailed(Reason.MODEL_FAILED, f"the model failed while running ({first}); it is not fit to serve") from None
