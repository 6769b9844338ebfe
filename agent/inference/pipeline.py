"""The loop: source -> task.prepare -> backend.run -> task.predictions -> transport, and its statistics.

One direction, one thread. Everything that changes a running pipeline goes through its control surface
(`tune`, `replace_source`, `restart_source`, `reload_model`, the slot's swap): changes are queued and applied
on the pipeline thread between two frames, so a frame never sees half of one, and nobody assigns the
pipeline's fields from outside.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent import __version__
from agent.errors import SourceError
from agent.inference.slot import ModelSlot
from agent.inference.tasks.base import Task
from agent.messages import (
    InferenceResult,
    MetricsMessage,
    SequenceCounter,
    ShadowFigures,
    StageLatency,
    StatusMessage,
)
from agent.settings import SourceSettings
from agent.sources import Frame, FrameSource, LiveSource, Pacer, open_source
from agent.sources.restartable import RestartableSource
from agent.transport.base import Transport

LATENCY_WINDOW = 1000  # frames kept for p50/p99


class FrameObserver(Protocol):
    """Something that watches the pipeline (live view, Prometheus metrics, watchdog, an update's health window).

    Called on the pipeline thread after every frame: it must only store references or bump counters,
    never encode, block or do I/O there.
    """

    def on_frame(self, frame: Frame, result: InferenceResult | None, latency_ms: float) -> None: ...


@dataclass(frozen=True)
class Tuning:
    """What a running pipeline may be told to change between frames (Greengrass configuration, the shadow)."""

    score_threshold: float = 0.5
    publish_empty: bool = False
    metrics_interval_s: float = 60.0
    max_fps: float | None = None  # at most this many frames a second (a live source drops the rest)


@dataclass
class PipelineStats:
    frames: int = 0
    results: int = 0
    predictions: int = 0
    started_monotonic: float = field(default_factory=time.monotonic)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else 0.0


def frame_colour(configured: bool | None, task: Task) -> bool:
    """Colour frames or grey: as `source.colour` is set, or (null) as the model's task reads them."""
    return task.reads_colour if configured is None else configured


def frame_settings(settings: SourceSettings, task: Task) -> SourceSettings:
    """The source settings with the colour of frames decided (`frame_colour`)."""
    return settings.model_copy(update={"colour": frame_colour(settings.colour, task)})


def restartable(source: FrameSource, reopen: Callable[[], FrameSource]) -> FrameSource:
    """A live source wrapped so the watchdog can reopen it in place; anything else as it is."""
    return RestartableSource(source, reopen) if isinstance(source, LiveSource) else source


class Pipeline:
    def __init__(
        self,
        source_settings: SourceSettings,
        slot: ModelSlot,
        transport: Transport,
        sequence: SequenceCounter,
        tuning: Tuning = Tuning(),
        *,
        source: FrameSource | None = None,
    ):
        """`source` overrides `source_settings` for callers that bring their own frames (infer, bench)."""
        self._colour_setting = source_settings.colour  # null: frames follow the model in use (`_follow_model_colour`)
        self._source_settings = source_settings = frame_settings(source_settings, slot.active.task)
        self._source = restartable(source or open_source(source_settings), self._reopen_source)
        self.slot = slot
        self.transport = transport
        self.sequence = sequence
        self._tuning = tuning
        self.stats = PipelineStats()
        self._observers: list[FrameObserver] = []
        self._update_listeners: list[Callable] = []
        self._between_frames: list[Callable[[], None]] = []
        self._changes: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._announced: tuple[str, str | None] = ("online", None)
        self._shadow: ShadowFigures | None = None  # the newest shadow evaluation's figures, in every status
        self._dropped_reported = 0
        self._stop = threading.Event()
        self._rate = Pacer(tuning.max_fps, sleep=self._stop.wait)  # a stop ends a frame-rate wait at once

    # -- read-only views ------------------------------------------------------------------------------

    @property
    def source(self) -> FrameSource:
        return self._source

    @property
    def tuning(self) -> Tuning:
        return self._tuning

    # -- the control surface (any thread) -------------------------------------------------------------

    def tune(self, **changes) -> None:
        """Change threshold, publish_empty, metrics interval or frame-rate cap from the next frame on."""
        def apply() -> None:
            self._tuning = dataclasses.replace(self._tuning, **changes)
            self._rate.set_fps(self._tuning.max_fps)

        self._changes.put(apply)

    def replace_source(self, settings: SourceSettings) -> None:
        """Open the source `settings` name between two frames and close the old one; the watchdog reopens
        this one from then on. A source that cannot be opened stops the loop with its SourceError."""

        def replace() -> None:
            resolved = frame_settings(settings, self.slot.active.task)
            fresh = restartable(open_source(resolved), self._reopen_source)
            old, self._source, self._source_settings, self._colour_setting = self._source, fresh, resolved, settings.colour
            old.close()

        self._changes.put(replace)

    def restart_source(self) -> None:
        """From the watchdog's thread while the loop may be blocked reading: reopen the current source in
        place (the settings it was last opened from). SourceError when it is not a live source."""
        source = self._source
        if not isinstance(source, RestartableSource):
            raise SourceError(f"source {source.name}: cannot be restarted in place; restart the agent")
        source.restart()

    def reload_model(self) -> None:
        """Put the model in use on a fresh backend (the watchdog's cure for a hung inference stage)."""
        self.slot.swap(self.slot.active.reloaded())

    def add_observer(self, observer: FrameObserver) -> None:
        self._observers.append(observer)

    def between_frames(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the pipeline thread before every frame (where a host applies what it was sent)."""
        self._between_frames.append(callback)

    def add_update_listener(self, listener: Callable) -> None:
        """Told every model update's outcome (agent.updates.manager.Outcome) and shadow evaluation's figures
        (agent.messages.ShadowFigures) through `report_update`."""
        self._update_listeners.append(listener)

    def report_update(self, outcome) -> None:
        for listener in self._update_listeners:
            listener(outcome)

    def stop(self) -> None:
        """Ask the loop to finish after the current frame (safe from signal handlers and other threads)."""
        self._stop.set()
        self._source.interrupt()

    # -- the pipeline thread --------------------------------------------------------------------------

    def _reopen_source(self) -> FrameSource:
        return open_source(self._source_settings)

    def _follow_model_colour(self) -> None:
        """With `source.colour` left to the model, a swap to a model that reads the other kind of frame (digits
        <-> faces) switches the source between grey and colour from the next frame on, without reopening it."""
        colour = frame_colour(self._colour_setting, self.slot.active.task)
        if colour != self._source.colour:
            self._source.set_colour(colour)
            self._source_settings = self._source_settings.model_copy(update={"colour": colour})

    def _apply_changes(self) -> None:
        """Hosts first (what they apply may queue changes), then every queued change, before the next frame."""
        for callback in self._between_frames:
            callback()
        while True:
            try:
                change = self._changes.get_nowait()
            except queue.Empty:
                break
            change()

    def process(self, frame: Frame) -> InferenceResult | None:
        """One frame through the model; None when there is nothing to publish.

        The sequence number is taken only for a result that will be published, so receivers see no false gaps.
        """
        model = self.slot.active
        start = time.perf_counter()
        inference = model.infer(frame.image, self._tuning.score_threshold)
        if not inference.predictions and not self._tuning.publish_empty:
            self._notify(frame, None, self._record(start))
            return None
        result = InferenceResult(
            **self.sequence.envelope(),
            source=frame.source,
            frame=frame.index,
            captured_at=frame.captured_at,
            model=model.ref,
            task=model.manifest.task_id,
            predictions=inference.predictions,
            latency=StageLatency(find_ms=inference.prepare_s * 1e3, classify_ms=inference.run_s * 1e3, total_ms=(time.perf_counter() - start) * 1e3),
        )
        self._notify(frame, result, self._record(start))
        return result

    def _notify(self, frame: Frame, result: InferenceResult | None, latency_ms: float) -> None:
        for observer in self._observers:
            observer.on_frame(frame, result, latency_ms)

    def _record(self, start: float) -> float:
        latency_ms = (time.perf_counter() - start) * 1e3
        self.stats.frames += 1
        self.stats.latencies_ms.append(latency_ms)
        return latency_ms

    def status(self, state: str, reason: str | None = None) -> StatusMessage:
        """A status message; the state and reason are remembered, so a later drop report repeats them."""
        self._announced = (state, reason)
        dropped = self.transport.stats().dropped
        self._dropped_reported = dropped
        return StatusMessage(**self.sequence.envelope(), state=state, agent_version=__version__, model=self.slot.active.ref, reason=reason, outbox_dropped=dropped, shadow=self._shadow)

    def announce_shadow(self, figures: ShadowFigures) -> None:
        """The status again, now (and from now on) with a shadow evaluation's figures: the retained status is
        where an operator reads how a candidate is doing. On the pipeline thread, between two frames."""
        self._shadow = figures
        self.transport.publish(self.status(*self._announced))

    def metrics(self, interval_s: float, transport_queued: int = 0, transport_dropped: int = 0) -> MetricsMessage:
        elapsed = max(time.monotonic() - self.stats.started_monotonic, 1e-9)
        source = self._source.stats
        return MetricsMessage(
            **self.sequence.envelope(),
            interval_s=interval_s,
            model=self.slot.active.ref,
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
        next_metrics = time.monotonic() + self._tuning.metrics_interval_s
        while not self._stop.is_set() and (max_frames is None or self.stats.frames < max_frames):
            self._apply_changes()
            self._follow_model_colour()
            self._rate.wait()
            frame = self._source.read()
            if frame is None:
                break
            result = self.process(frame)
            if result is not None:
                self.transport.publish(result)
                self.stats.results += 1
                self.stats.predictions += len(result.predictions)
            if time.monotonic() >= next_metrics:
                self._publish_metrics()
                next_metrics += self._tuning.metrics_interval_s
        return self.stats

    def _publish_metrics(self) -> None:
        transport = self.transport.stats()
        self.transport.publish(self.metrics(self._tuning.metrics_interval_s, transport.queued, transport.dropped))
        if transport.dropped > self._dropped_reported:  # the retained status says so too
            self.transport.publish(self.status(*self._announced))
