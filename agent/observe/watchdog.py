"""Restarts a stage that is stuck, counts it, and reports ERRORED when restarting does not help.

Two stages can get stuck: the source (a camera driver or a stream that blocks without ever failing, so
the live source's own reconnect never starts) and inference (one frame that never finishes). The
watchdog tells them apart by two times: when the pipeline last took a frame from the source, and when
it last finished one. A stage stuck past its limit is restarted once per limit; `max_restarts` restarts
in a row without frames coming back mark the agent ERRORED (`Health.fault` and the `on_errored` hook,
which the Greengrass component turns into UpdateState ERRORED). Frames flowing again clear it.

The same thread reports each change of `Health` (`on_health`: the status topic's online/degraded). It
has to be this thread: when the source is stuck, the pipeline thread is stuck with it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from agent.errors import AgentError
from agent.inference.pipeline import Pipeline
from agent.observe.metrics import Health, Metrics
from agent.settings import WatchdogSettings
from agent.sources import Frame

log = logging.getLogger(__name__)


class Watchdog:
    """A FrameObserver (it notes when each frame finished) plus a thread that looks every few seconds."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: WatchdogSettings,
        health: Health,
        metrics: Metrics,
        restart: dict[str, Callable[[], None]],
        on_errored: Callable[[str], None] | None = None,
        on_health: Callable[[bool, str], None] | None = None,
    ):
        self._pipeline = pipeline
        self._settings = settings
        self._health = health
        self._metrics = metrics
        self._restart = restart
        self._on_errored = on_errored
        self._on_health = on_health
        self._healthy = True  # as announced when the transport started ("online")
        self._finished: float = time.monotonic()  # when the last frame finished (start counts as one)
        self._last_restart: float = 0.0
        self._restarts_in_a_row = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def on_frame(self, frame: Frame, result, latency_ms: float) -> None:
        self._finished = time.monotonic()

    def stalled(self) -> tuple[str, float]:
        """Which stage the pipeline is waiting on, and for how many seconds it has been."""
        now = time.monotonic()
        taken = self._pipeline.source.stats.last_frame_monotonic or 0.0
        if taken > self._finished:
            return "inference", now - max(taken, self._last_restart)
        return "source", now - max(self._finished, self._last_restart)

    def check(self) -> None:
        """One look: restart a stage stuck past its limit; clear ERRORED once frames flow again."""
        stage, seconds = self.stalled()
        limit = self._settings.inference_stall_s if stage == "inference" else self._settings.source_stall_s
        if seconds <= limit:
            if self._finished > self._last_restart:
                self._restarts_in_a_row = 0
                self._health.fault = None
            return
        self._last_restart = time.monotonic()
        self._restarts_in_a_row += 1
        self._metrics.watchdog_restarts.labels(stage).inc()
        problem = f"{stage} stuck for {seconds:.0f} s"
        try:
            self._restart[stage]()
            log.warning("watchdog: %s; restarted it (%d in a row)", problem, self._restarts_in_a_row)
        except AgentError as error:
            problem = f"{problem}; restart failed: {error}"
            log.warning("watchdog: %s", problem)
        if self._restarts_in_a_row >= self._settings.max_restarts and self._health.fault is None:
            self._health.fault = f"{problem} ({self._restarts_in_a_row} restarts did not help)"
            if self._on_errored is not None:
                self._on_errored(self._health.fault)

    def start(self) -> Watchdog:
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def report_health(self) -> None:
        """Tell `on_health` when health changed since the last report."""
        ok, reason = self._health.check()
        if ok != self._healthy:
            self._healthy = ok
            if self._on_health is not None:
                self._on_health(ok, reason)

    def _run(self) -> None:
        while not self._stop.wait(self._settings.check_interval_s):
            self.check()
            self.report_health()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def supervise(
    pipeline: Pipeline,
    settings: WatchdogSettings,
    health: Health,
    metrics: Metrics,
    on_errored: Callable[[str], None] | None = None,
    on_health: Callable[[bool, str], None] | None = None,
) -> Watchdog:
    """Watch `pipeline` and start watching; close() the result to stop.

    Restarts go through the pipeline's own controls, so a source or model replaced since start (a
    configuration update) is the one restarted.
    """
    restart = {"source": pipeline.restart_source, "inference": pipeline.reload_model}
    watchdog = Watchdog(pipeline, settings, health, metrics, restart, on_errored, on_health)
    pipeline.add_observer(watchdog)
    return watchdog.start()
