"""What an operator (or a supervisor) asks a running agent: is it healthy, and what are its numbers.

`Health.check()` is the one answer to "is the agent serving?": `/healthz`, the status topic and the
Greengrass UpdateState all ask it, so they never disagree. `Metrics` is the agent in Prometheus form,
on its own registry (never the process-global one, so two agents in one process or a test never mix).
Counters the pipeline, source and transport already keep are read at scrape time; the pipeline thread
only observes latency histograms, which costs microseconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.messages import ShadowFigures
from agent.updates.manager import Outcome

if TYPE_CHECKING:
    from agent.inference.pipeline import Pipeline
    from agent.messages import InferenceResult
    from agent.sources import Frame

# How a model update attempt ended: the AWS IoT Jobs status it reported (agent.updates.manager.Status), lowercased.
UPDATE_OUTCOMES = ("succeeded", "failed", "rejected")
STAGES = ("find", "classify", "total")
# Seconds: from a fast classify (0.1 ms) to a badly overloaded frame (2 s).
LATENCY_BUCKETS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
# A shadow evaluation's figures (agent.messages.ShadowFigures), one gauge each, labelled by candidate.
SHADOW_FIGURES = {
    "agreement": "Share of predictions a candidate in shadow agrees on with the serving model",
    "box_match": "Share of predictions a candidate in shadow matched by box (IoU 0.5) with the serving model",
    "label_agreement": "Of a shadow candidate's matched predictions, the share with the serving model's label",
    "score_drift": "Mean score of a shadow candidate minus the serving model's, over matched predictions",
    "latency_ratio": "Median time per frame of a shadow candidate over the serving model's",
    "frames": "Frames a candidate in shadow evaluated",
    "frames_skipped": "Sampled frames a candidate in shadow skipped (busy or over its CPU budget)",
}


class Health:
    """Healthy once a model is loaded and frames are flowing; otherwise unhealthy, with the reason.

    The model is loaded by construction (a Pipeline has a ModelSlot); frames flow when the source
    delivered one within `stale_after_s`. The watchdog sets `fault` when it gave up on a stage.
    """

    def __init__(self, pipeline: Pipeline, stale_after_s: float):
        self._pipeline = pipeline
        self._stale_after_s = stale_after_s
        self.fault: str | None = None

    def check(self) -> tuple[bool, str]:
        if self.fault:
            return False, self.fault
        model = self._pipeline.slot.active.ref
        source = self._pipeline.source
        last = source.stats.last_frame_monotonic
        if last is None:
            return False, f"no frame from {source.name} yet"
        age = time.monotonic() - last
        if age > self._stale_after_s:
            return False, f"no frame from {source.name} for {age:.1f} s"
        return True, f"serving {model.name} {model.version}"


class Metrics:
    """The agent's Prometheus metrics. A FrameObserver: on the pipeline thread it only observes latencies."""

    def __init__(self, pipeline: Pipeline, transport_name: str, health: Health):
        self.registry = CollectorRegistry()
        self.stage_latency = Histogram(
            "edge_agent_stage_latency_seconds", "Time per pipeline stage, for frames that produced a result",
            ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.frame_latency = Histogram(
            "edge_agent_frame_latency_seconds", "Time from frame handed to the pipeline to result built, every frame",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.update_attempts = Counter(
            "edge_agent_model_update_attempts", "Model update attempts, by outcome and reason code", ["outcome", "reason"], registry=self.registry
        )
        self.watchdog_restarts = Counter(
            "edge_agent_watchdog_restarts", "Stuck stages the watchdog restarted", ["stage"], registry=self.registry
        )
        for outcome in UPDATE_OUTCOMES:
            self.update_attempts.labels(outcome, "")
        for stage in ("source", "inference"):
            self.watchdog_restarts.labels(stage)
        self.shadow = {
            figure: Gauge(f"edge_agent_shadow_{figure}", help_text, ["model", "candidate"], registry=self.registry) for figure, help_text in SHADOW_FIGURES.items()
        }
        self.shadow_running = Gauge("edge_agent_shadow_running", "1 while a candidate model runs in shadow", registry=self.registry)
        self._stages = [self.stage_latency.labels(stage) for stage in STAGES]
        self.registry.register(_AgentCollector(pipeline, transport_name, health))

    def on_frame(self, frame: Frame, result: InferenceResult | None, latency_ms: float) -> None:
        self.frame_latency.observe(latency_ms / 1e3)
        if result is not None:
            latency = result.latency
            for histogram, ms in zip(self._stages, (latency.find_ms, latency.classify_ms, latency.total_ms)):
                histogram.observe(ms / 1e3)

    def on_update(self, event) -> None:
        """Pipeline update listener: an update's outcome is counted; shadow figures set the shadow gauges."""
        if isinstance(event, ShadowFigures):
            self.shadow_figures(event)
        elif isinstance(event, Outcome):
            self.count_update(event.status.value, event.reason)

    def shadow_figures(self, figures: ShadowFigures) -> None:
        for figure, gauge in self.shadow.items():
            value = getattr(figures, figure)
            if value is not None:
                gauge.labels(figures.candidate.name, figures.candidate.version).set(value)
        self.shadow_running.set(int(figures.state == "running"))

    def count_captures(self, stats) -> None:
        """Data capture's counts (agent.capture.spool.SpoolStats), read at scrape time."""
        self.registry.register(_CaptureCollector(stats))

    def count_update(self, outcome: str, reason: str | None = None) -> None:
        """One model update attempt ended: `outcome` is its Jobs status, `reason` its reason code if it failed."""
        outcome = outcome.lower()
        if outcome not in UPDATE_OUTCOMES:
            raise ValueError(f"update outcome {outcome!r} is not one of {', '.join(UPDATE_OUTCOMES)}")
        self.update_attempts.labels(outcome, reason or "").inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric, for `/metrics`."""
        return generate_latest(self.registry)


class _CaptureCollector(Collector):
    """Frames kept for retraining, dropped, waiting and uploaded, from the capture spool's own counts."""

    def __init__(self, stats):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        kept = CounterMetricFamily("edge_agent_captures_kept", "Frames kept for retraining, by strategy", labels=["strategy"])
        for strategy in ("near_threshold", "disagreement", "random"):
            kept.add_metric([strategy], stats.kept[strategy])
        yield kept
        dropped = CounterMetricFamily("edge_agent_captures_dropped", "Frames chosen but not kept, or thrown away unsent, by reason", labels=["reason"])
        for reason in ("daily_limit", "queue_full", "spool_full", "too_old", "write_failed"):
            dropped.add_metric([reason], stats.dropped[reason])
        yield dropped
        yield CounterMetricFamily("edge_agent_captures_uploaded", "Captures put in S3", value=stats.uploaded)
        yield CounterMetricFamily("edge_agent_captures_uploaded_bytes", "Bytes of captures put in S3", value=stats.uploaded_bytes)
        yield CounterMetricFamily("edge_agent_capture_upload_failures", "Upload rounds that failed (and were retried)", value=stats.upload_failures)
        yield GaugeMetricFamily("edge_agent_captures_waiting", "Captures in the spool waiting for upload", value=stats.waiting)
        yield GaugeMetricFamily("edge_agent_captures_waiting_bytes", "Bytes of captures waiting in the spool", value=stats.waiting_bytes)


class _AgentCollector(Collector):
    """Reads the counters the source, pipeline and transport keep anyway, at scrape time."""

    def __init__(self, pipeline: Pipeline, transport_name: str, health: Health):
        self._pipeline = pipeline
        self._transport_name = transport_name
        self._health = health

    def collect(self) -> Iterator[Metric]:
        pipeline = self._pipeline
        source = pipeline.source.stats
        for name, help_text, value in (
            ("frames_read", "Frames the source delivered", source.read),
            ("frames_dropped", "Frames a live source replaced before the pipeline took them", source.dropped),
            ("frames_corrupt", "Frames that did not decode and were skipped", source.corrupt),
            ("source_reconnects", "Times a live source was reopened", source.reconnects),
            ("frames_processed", "Frames that went through the model", pipeline.stats.frames),
            ("results", "Inference results published", pipeline.stats.results),
            ("predictions", "Predictions in published results", pipeline.stats.predictions),
        ):
            yield CounterMetricFamily(f"edge_agent_{name}", help_text, value=value)
        if source.last_frame_monotonic is not None:
            yield GaugeMetricFamily("edge_agent_last_frame_age_seconds", "Seconds since the source last delivered a frame",
                                    value=time.monotonic() - source.last_frame_monotonic)

        transport = pipeline.transport.stats()
        labels = ["transport"]
        connected = GaugeMetricFamily("edge_agent_transport_connected", "1 while the transport is connected (MQTT: CONNACK received)", labels=labels)
        connected.add_metric([self._transport_name], int(transport.connected))
        yield connected
        for name, help_text, value in (
            ("transport_reconnects", "Times the transport connected again after losing its connection", transport.reconnects),
            ("messages_sent", "Messages handed to the network", transport.sent),
            ("messages_acknowledged", "Messages the far side acknowledged (PUBACK)", transport.acknowledged),
            ("messages_failed", "Messages refused for good", transport.failed),
            ("outbox_dropped", "Messages the outbox dropped (too old or over its size)", transport.dropped),
        ):
            family = CounterMetricFamily(f"edge_agent_{name}", help_text, labels=labels)
            family.add_metric([self._transport_name], value)
            yield family
        depth = GaugeMetricFamily("edge_agent_outbox_depth", "Messages waiting in the outbox", labels=labels)
        depth.add_metric([self._transport_name], transport.queued)
        yield depth
        oldest = GaugeMetricFamily("edge_agent_outbox_oldest_age_seconds", "Age of the oldest message waiting (0 when empty)", labels=labels)
        oldest.add_metric([self._transport_name], transport.oldest_age_s or 0.0)
        yield oldest

        ref = pipeline.slot.active.ref
        yield InfoMetricFamily("edge_agent_model", "The model in use", value={"name": ref.name, "version": ref.version, "sha256": ref.sha256})
        yield GaugeMetricFamily("edge_agent_healthy", "1 while /healthz answers 200", value=int(self._health.check()[0]))
