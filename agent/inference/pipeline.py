"""The loop: source -> preprocess -> model -> postprocess -> transport, and its statistics.

One direction, one thread. The model lives in a `ModelSlot` that the update manager swaps between two
frames (a reference assignment), so a swap never drops or splits a frame.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from agent import __version__
from agent.inference.model import LoadedModel
from agent.inference.tasks.registry import Preprocessor, preprocessor_for
from agent.messages import (
    Box,
    InferenceResult,
    MetricsMessage,
    ModelRef,
    Prediction,
    SequenceCounter,
    StageLatency,
    StatusMessage,
)
from agent.sources import Frame, FrameSource
from agent.transport.base import Transport

LATENCY_WINDOW = 1000  # frames kept for p50/p99


class FrameObserver(Protocol):
    """Something that watches the pipeline (live view, Prometheus metrics, watchdog).

    Called on the pipeline thread after every frame: it must only store references or bump counters,
    never encode, block or do I/O there.
    """

    def on_frame(self, frame: Frame, result: InferenceResult | None, latency_ms: float) -> None: ...


@dataclass(frozen=True)
class ActiveModel:
    """A model together with the preprocessing its manifest asks for."""

    model: LoadedModel
    preprocessor: Preprocessor
    ref: ModelRef


class ModelSlot:
    """Holds the model in use. `swap` is atomic from the pipeline's point of view: a frame sees one model."""

    def __init__(self, model: LoadedModel, vision_settings):
        self._vision_settings = vision_settings
        self._active = self._activate(model)
        self._lock = threading.Lock()

    def _activate(self, model: LoadedModel) -> ActiveModel:
        manifest = model.bundle.manifest
        return ActiveModel(
            model=model,
            preprocessor=preprocessor_for(manifest.input.preprocessing, model.runtime.input.shape, self._vision_settings),
            ref=ModelRef(name=manifest.name, version=manifest.version, sha256=manifest.files["model.tflite"]),
        )

    @property
    def active(self) -> ActiveModel:
        return self._active

    def swap(self, model: LoadedModel) -> ActiveModel:
        """Put `model` in service from the next frame on; returns the one it replaced."""
        replacement = self._activate(model)
        with self._lock:
            previous, self._active = self._active, replacement
        return previous


@dataclass
class PipelineStats:
    frames: int = 0
    results: int = 0
    predictions: int = 0
    started_monotonic: float = field(default_factory=time.monotonic)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0


class Pipeline:
    def __init__(
        self,
        source: FrameSource,
        slot: ModelSlot,
        transport: Transport,
        sequence: SequenceCounter,
        *,
        score_threshold: float,
        publish_empty: bool = False,
        metrics_interval_s: float = 60.0,
    ):
        self.source = source
        self.slot = slot
        self.transport = transport
        self.sequence = sequence
        self.score_threshold = score_threshold
        self.publish_empty = publish_empty
        self.metrics_interval_s = metrics_interval_s
        self.stats = PipelineStats()
        self.observers: list[FrameObserver] = []
        # Told every model update's outcome (agent.bundles.updates.Outcome); the pipeline only carries the list, so
        # the update manager (built by the host) and the metrics (built around the run) can meet.
        self.update_listeners: list = []
        self._announced: tuple[str, str | None] = ("online", None)
        self._dropped_reported = 0
        # Called on the pipeline thread before each frame is read: where live changes (settings from the
        # Greengrass nucleus, a model swap) are applied, so a frame never sees half of one.
        self.between_frames: list[Callable[[], None]] = []
        self._stop = threading.Event()

    def process(self, frame: Frame) -> InferenceResult | None:
        """One frame through preprocess -> model -> postprocess; None when there is nothing to publish.

        The sequence number is taken only for a result that will be published, so receivers see no false gaps.
        """
        active = self.slot.active
        start = time.perf_counter()
        found = active.preprocessor.find(frame.image)
        found_at = time.perf_counter()
        scores = active.model.runtime.classify(found.images) if len(found) else np.empty((0, 0), np.float32)
        classified_at = time.perf_counter()
        predictions = self._predictions(scores, found.boxes, active.model.bundle.labels)
        if not predictions and not self.publish_empty:
            self._notify(frame, None, self._record(start))
            return None
        result = InferenceResult(
            **self.sequence.envelope(),
            source=frame.source,
            frame=frame.index,
            captured_at=frame.captured_at,
            model=active.ref,
            predictions=predictions,
            latency=StageLatency(
                find_ms=(found_at - start) * 1e3,
                classify_ms=(classified_at - found_at) * 1e3,
                total_ms=(time.perf_counter() - start) * 1e3,
            ),
        )
        self._notify(frame, result, self._record(start))
        return result

    def _notify(self, frame: Frame, result: InferenceResult | None, latency_ms: float) -> None:
        for observer in self.observers:
            observer.on_frame(frame, result, latency_ms)

    def _record(self, start: float) -> float:
        latency_ms = (time.perf_counter() - start) * 1e3
        self.stats.frames += 1
        self.stats.latencies_ms.append(latency_ms)
        return latency_ms

    def _predictions(self, scores: np.ndarray, boxes: np.ndarray, labels: list[str]) -> list[Prediction]:
        predictions = []
        for row, (x, y, w, h) in zip(scores, boxes):
            best = int(np.argmax(row))
            score = float(row[best])
            if score >= self.score_threshold:
                box = Box(x=int(x), y=int(y), w=int(w), h=int(h))
                predictions.append(Prediction(label=labels[best], class_index=best, score=min(score, 1.0), box=box))
        return predictions

    def stop(self) -> None:
        """Ask the loop to finish after the current frame (safe from signal handlers and other threads)."""
        self._stop.set()
        self.source.interrupt()

    def status(self, state: str, reason: str | None = None) -> StatusMessage:
        """A status message; the state and reason are remembered, so a later drop report repeats them."""
        self._announced = (state, reason)
        dropped = self.transport.stats().dropped
        self._dropped_reported = dropped
        return StatusMessage(**self.sequence.envelope(), state=state, agent_version=__version__, model=self.slot.active.ref, reason=reason, outbox_dropped=dropped)

    def metrics(self, interval_s: float, transport_queued: int = 0, transport_dropped: int = 0) -> MetricsMessage:
        elapsed = max(time.monotonic() - self.stats.started_monotonic, 1e-9)
        source = self.source.stats
        return MetricsMessage(
            **self.sequence.envelope(),
            interval_s=interval_s,
            frames_read=source.read,
            frames_dropped=source.dropped,
            frames_corrupt=source.corrupt,
            results=self.stats.results,
            fps=self.stats.frames / elapsed,
            latency_p50_ms=self.stats.percentile_ms(50),
            latency_p99_ms=self.stats.percentile_ms(99),
            outbox_depth=transport_queued,
            outbox_dropped=transport_dropped,
        )

    def run(self, max_frames: int | None = None) -> PipelineStats:
        """Process frames until the source ends, `max_frames` is reached, or `stop()` is called."""
        next_metrics = time.monotonic() + self.metrics_interval_s
        while not self._stop.is_set() and (max_frames is None or self.stats.frames < max_frames):
            for apply_changes in self.between_frames:
                apply_changes()
            frame = self.source.read()
            if frame is None:
                break
            result = self.process(frame)
            if result is not None:
                self.transport.publish(result)
                self.stats.results += 1
                self.stats.predictions += len(result.predictions)
            if time.monotonic() >= next_metrics:
                transport = self.transport.stats()
                self.transport.publish(self.metrics(self.metrics_interval_s, transport.queued, transport.dropped))
                if transport.dropped > self._dropped_reported:  # the retained status says so too
                    self.transport.publish(self.status(*self._announced))
                next_metrics += self.metrics_interval_s
        return self.stats
