"""Builds a running agent from Settings: model, source, transport, pipeline; and shuts it down cleanly."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import signal
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import cv2

from agent.bundles.starting import starting_keys
from agent.capture.spool import CaptureSpool
from agent.cloud.host import Host
from agent.errors import AgentError, ConfigError
from agent.inference.model import LoadedModel, load_model
from agent.inference.pipeline import Pipeline, Tuning, frame_settings
from agent.inference.slot import ModelSlot
from agent.messages import SequenceCounter
from agent.observe.liveview import LiveViewServer
from agent.observe.metrics import Health, Metrics
from agent.observe.watchdog import supervise
from agent.settings import Settings, SourceSettings
from agent.sources import FrameSource, open_source
from agent.topics import Topics
from agent.transport.base import Transport

log = logging.getLogger(__name__)

# Explicit registry: transport name -> "module:factory". Imported only when chosen, so the console
# transport never pays for awscrt. Each factory takes (settings, topics) and returns a Transport.
TRANSPORTS = {
    "console": "agent.transport.console:from_settings",
    "mqtt": "agent.transport.mqtt:from_settings",
    "greengrass": "agent.transport.greengrass:from_settings",
}
# What the agent can run under, besides nothing (the do-nothing Host): the Greengrass nucleus, or IoT Core's
# Jobs and Shadow. Each factory takes the settings and returns a Host; host_name() picks one.
HOSTS = {"nucleus": "agent.cloud.nucleus:host_from_settings", "iot-core": "agent.cloud.iot_core:host_from_settings"}
# From the last frame to the exit, whatever the cloud does (systemd's TimeoutStopSec is 15 s): the outbox
# drains and the offline status goes out within it; what is undelivered then waits in the outbox.
STOP_TIMEOUT_S = 4.0


def host_name(settings: Settings) -> str | None:
    """The nucleus when it started us (transport greengrass); IoT Core's services when the `iot` settings turn
    Jobs or Shadow on and there is an MQTT connection for them to ride on; otherwise none."""
    if settings.transport == "greengrass":
        return "nucleus"
    if settings.transport == "mqtt" and (settings.iot.jobs or settings.iot.shadow):
        return "iot-core"
    return None


def build_host(settings: Settings) -> Host:
    name = host_name(settings)
    if name is None:
        return Host()
    module_name, factory = HOSTS[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(settings)


def build_transport(settings: Settings) -> Transport:
    module_name, factory = TRANSPORTS[settings.transport].split(":")
    topics = Topics.for_thing(settings.topics, settings.thing_name)
    return getattr(importlib.import_module(module_name), factory)(settings, topics)


def load_configured_model(settings: Settings) -> LoadedModel:
    """The model the settings name, verified and checked, or a ModelError. The bundle shipped in the package is
    also accepted with the development keys shipped beside it (agent/bundles/starting.py); updates are not."""
    model = settings.model
    starting = model.model_copy(update={"trusted_keys": starting_keys(model.bundle, model.trusted_keys)})
    return load_model(model.bundle, starting, settings.tasks)


def tuning(settings: Settings) -> Tuning:
    """The part of the settings a running pipeline can be told to change between frames."""
    return Tuning(score_threshold=settings.model.score_threshold, publish_empty=settings.publish_empty, metrics_interval_s=settings.metrics_interval_s)


def build_pipeline(
    settings: Settings,
    transport: Transport,
    sequence: SequenceCounter,
    source: Callable[[SourceSettings], FrameSource] | None = None,
    publish_empty: bool | None = None,
) -> Pipeline:
    """Model first (the likeliest thing to be wrong), then the source; both fail with one clear line.

    `source` and `publish_empty` override the settings for `infer` and `bench`, which bring their own frames
    (`source` opens them, given the source settings with the colour the model reads decided).
    """
    cv2.setNumThreads(-1 if settings.opencv_threads is None else settings.opencv_threads)
    slot = ModelSlot(load_configured_model(settings))
    wanted = tuning(settings)
    if publish_empty is not None:
        wanted = dataclasses.replace(wanted, publish_empty=publish_empty)
    frames = frame_settings(settings.source, slot.active.task)
    # Only start-up waits for a camera or stream that is not there yet; the pipeline's own reopens try once.
    opened = source(frames) if source else open_source(frames, wait_s=frames.open_timeout_s)
    return Pipeline(frames, slot, transport, sequence, wanted, source=opened)


def log_serving(pipeline: Pipeline) -> None:
    ref = pipeline.slot.active.ref
    log.info(
        "serving model %s version %s on backend %s (%s)", ref.name, ref.version, ref.backend, ref.device,
        extra={"model": ref.name, "version": ref.version, "backend": ref.backend, "device": ref.device},
    )


@contextmanager
def stop_on_signals(pipeline: Pipeline) -> Iterator[None]:
    """SIGTERM (how Greengrass and systemd stop us) and Ctrl-C finish the current frame, then shut down;
    a transport still waiting for its first connection stops waiting."""

    def handler(signum, frame) -> None:
        pipeline.stop()
        pipeline.transport.interrupt()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def capturing(pipeline: Pipeline, settings: Settings) -> Iterator[CaptureSpool | None]:
    """If enabled, data capture around a running pipeline: kept frames to the spool and, with a bucket, to S3
    with temporary credentials (agent.cloud.credentials). The spool (and its counts), or None."""
    capture = settings.capture
    if not capture.enabled:
        yield None
        return
    from agent.capture.capturer import Capturer
    from agent.capture.spool import CaptureSpool

    spool = CaptureSpool(capture.spool, max_per_day=capture.max_per_day, max_bytes=int(capture.max_mb * 1024 * 1024), max_age_s=capture.max_age_days * 86400)
    uploader = None
    if capture.bucket:
        try:
            from agent.capture.uploader import Uploader
            from agent.cloud.credentials import credential_provider, s3_client
        except ImportError:
            raise ConfigError("capture.bucket: uploading captures needs botocore; install edge-agent[capture], or set capture.bucket null to keep captures on the device") from None

        provider = credential_provider(capture.credentials, settings.mqtt, settings.thing_name)
        uploader = Uploader(spool, capture, lambda: s3_client(provider, capture.region, capture.s3_endpoint_url)).start()
    capturer = Capturer(capture, settings.thing_name, spool, lambda: pipeline.slot.active.ref, lambda: pipeline.tuning.score_threshold, wake=uploader.wake if uploader else lambda: None).start()
    pipeline.add_observer(capturer)
    pipeline.add_update_listener(capturer.on_update)
    try:
        yield spool
    finally:
        capturer.close()
        if uploader is not None:
            uploader.close()


@contextmanager
def observed(pipeline: Pipeline, settings: Settings, capture: CaptureSpool | None = None) -> Iterator[Health]:
    """Health, the watchdog and, if enabled, the live view server (/metrics, /healthz) around a running pipeline."""
    health = Health(pipeline, settings.watchdog.stale_after_s)
    metrics = Metrics(pipeline, settings.transport, health)
    if capture is not None:
        metrics.count_captures(capture.stats)
    pipeline.add_update_listener(metrics.on_update)
    server = LiveViewServer(pipeline, settings.liveview, metrics, health).start() if settings.liveview.enabled else None
    if server is not None:
        pipeline.add_observer(metrics)
        pipeline.add_observer(server.view)
    watchdog = None
    if settings.watchdog.enabled:
        def announce(ok: bool, reason: str) -> None:  # health changes, on the retained status topic
            pipeline.transport.publish(pipeline.status("online" if ok else "degraded", None if ok else reason))

        watchdog = supervise(pipeline, settings.watchdog, health, metrics, on_health=announce)
    try:
        yield health
    finally:
        if server is not None:
            server.close()
        if watchdog is not None:
            watchdog.close()


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a finished run did: the line `edge-agent run` prints on stderr as it ends."""

    frames: int  # processed
    results: int  # published
    predictions: int
    frames_corrupt: int  # skipped: they did not decode
    frames_dropped: int  # a live source's frames the pipeline was too slow (or too paced) to take

    @classmethod
    def of(cls, pipeline: Pipeline) -> RunSummary:
        stats, source = pipeline.stats, pipeline.source.stats
        return cls(stats.frames, stats.results, stats.predictions, source.corrupt, source.dropped)


def run_agent(settings: Settings) -> RunSummary:
    """The `edge-agent run` command: serve until the source ends, max_frames, or a stop signal."""
    host = build_host(settings)
    pipeline: Pipeline | None = None
    started = False
    try:
        settings = host.configure(settings)
        transport = build_transport(settings)
        pipeline = build_pipeline(settings, transport, SequenceCounter(settings.thing_name))
        # Observers first: a live view port already in use fails here, before `online` is announced.
        with stop_on_signals(pipeline), capturing(pipeline, settings) as capture, observed(pipeline, settings, capture):
            # The will first: its sequence number is the one before the online status's, its own (README).
            will = pipeline.status("offline", reason="connection lost") if transport.has_last_will else None
            transport.start(pipeline.status("online"), will)
            started = True
            host.serving(pipeline)
            log_serving(pipeline)  # after the host: it may have put the model store's model in service
            pipeline.run(settings.max_frames)
            return RunSummary.of(pipeline)
    except AgentError as error:
        host.failed(error)
        raise
    finally:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        if pipeline is not None:
            pipeline.source.close()
        host.close()  # before the transport: Jobs, Shadow and IPC requests ride on its connection
        if started:
            transport.close(pipeline.status("offline", reason="stopped"), timeout_s=max(0.0, deadline - time.monotonic()))
