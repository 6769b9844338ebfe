"""Metrics, health and the watchdog on a real agent: real frames from the sample video, or from an MJPEG
stream this test serves over HTTP and can stop, restart or freeze, read by OpenCV's FFmpeg like a camera
(tests/mjpeg_camera.py)."""

from __future__ import annotations

import io
import json
import socket
import threading

import pytest
from agent_process import get, metrics, running_agent, wait_for
from conftest import SAMPLE_VIDEO, run_cli
from mjpeg_camera import MjpegCamera, camera  # noqa: F401 (camera: a fixture)
from prometheus_client.parser import text_string_to_metric_families

from agent.app import build_pipeline
from agent.messages import SequenceCounter
from agent.observe.metrics import Health, Metrics
from agent.observe.watchdog import supervise
from agent.settings import Settings, WatchdogSettings
from agent.sources.restartable import RestartableSource
from agent.transport.console import ConsoleTransport


def test_metrics_move_as_frames_flow():
    with running_agent("--source", SAMPLE_VIDEO, "--loop", "--pace-fps", "15") as url:
        first = wait_for(lambda: (m := metrics(url))["edge_agent_results_total"] >= 5 and m, "results")
        later = wait_for(lambda: (m := metrics(url))["edge_agent_frames_read_total"] >= first["edge_agent_frames_read_total"] + 15 and m, "more frames")
    for counter in ("frames_read_total", "frames_processed_total", "results_total", "predictions_total", "frame_latency_seconds_count"):
        assert later[f"edge_agent_{counter}"] > first[f"edge_agent_{counter}"], counter
    for stage in ("find", "classify", "total"):
        assert later[f'edge_agent_stage_latency_seconds_count{{stage="{stage}"}}'] > first[f'edge_agent_stage_latency_seconds_count{{stage="{stage}"}}']
    # Every published result had its stages timed (one more may be timed and not yet counted as published).
    assert later["edge_agent_results_total"] <= later['edge_agent_stage_latency_seconds_count{stage="total"}'] <= later["edge_agent_results_total"] + 1
    assert later["edge_agent_frames_corrupt_total"] == 0 and later["edge_agent_frames_dropped_total"] == 0
    info = next(key for key in later if key.startswith("edge_agent_model_info{"))
    assert 'name="mnist-int8"' in info and later[info] == 1
    assert later['edge_agent_transport_connected{transport="console"}'] == 1
    assert later['edge_agent_messages_sent_total{transport="console"}'] > first['edge_agent_messages_sent_total{transport="console"}']
    assert later['edge_agent_outbox_depth{transport="console"}'] == 0
    assert later['edge_agent_model_update_attempts_total{outcome="succeeded",reason=""}'] == 0
    assert later['edge_agent_watchdog_restarts_total{stage="source"}'] == 0
    assert later["edge_agent_healthy"] == 1


def test_healthz_follows_the_camera(camera):
    env = {
        "EDGE_AGENT_WATCHDOG__STALE_AFTER_S": "1",
        "EDGE_AGENT_SOURCE__RECONNECT_INITIAL_S": "0.2",
        "EDGE_AGENT_SOURCE__RECONNECT_MAX_S": "0.5",
        "EDGE_AGENT_SOURCE__READ_TIMEOUT_S": "2",
    }
    with running_agent("--source", camera.url, env=env) as agent:
        wait_for(lambda: get(agent + "healthz")[0] == 200, "healthy while the camera streams")
        camera.stop()
        status, body = wait_for(lambda: (answer := get(agent + "healthz"))[0] == 503 and answer, "unhealthy once the camera is gone")
        assert f"no frame from {camera.url} for" in body.decode()
        assert metrics(agent)["edge_agent_healthy"] == 0
        # The status topic (the console transport's stderr) says the same, with the same reason.
        states = wait_for(lambda: (found := statuses(agent))[-1]["state"] == "degraded" and found, "degraded on the status topic")
        assert states[0]["state"] == "online" and f"no frame from {camera.url} for" in states[-1]["reason"]
        camera.start()
        wait_for(lambda: get(agent + "healthz")[0] == 200, "healthy again once the camera is back")
        assert metrics(agent)["edge_agent_source_reconnects_total"] >= 1
        wait_for(lambda: statuses(agent)[-1]["state"] == "online", "online again on the status topic")


def statuses(agent) -> list[dict]:
    messages = (json.loads(line) for line in agent.stderr().splitlines() if line.startswith("{"))
    return [m for m in messages if m["kind"] == "status"]


class Running:
    """A pipeline built from settings, run on its own thread with health, metrics and the watchdog."""

    def __init__(self, settings: Settings, watchdog: WatchdogSettings, blocker=None):
        self.pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter("test"))
        if blocker is not None:
            self.pipeline.add_observer(blocker)
        self.health = Health(self.pipeline, watchdog.stale_after_s)
        self.metrics = Metrics(self.pipeline, "console", self.health)
        self.errored: list[str] = []
        self.health_changes: list[tuple[bool, str]] = []
        self.watchdog = supervise(
            self.pipeline, watchdog, self.health, self.metrics,
            on_errored=self.errored.append, on_health=lambda ok, reason: self.health_changes.append((ok, reason)),
        )
        self.thread = threading.Thread(target=self.pipeline.run, daemon=True)
        self.thread.start()

    def restarts(self, stage: str) -> float:
        return self.metrics.registry.get_sample_value("edge_agent_watchdog_restarts_total", {"stage": stage})

    def frames_flow(self, what: str) -> None:
        start = self.pipeline.stats.frames
        wait_for(lambda: self.pipeline.stats.frames >= start + 10, what)

    def close(self) -> None:
        self.watchdog.close()
        self.pipeline.stop()
        self.thread.join(timeout=30)


def stream_settings(camera: MjpegCamera, read_timeout_s: float = 30) -> Settings:
    # A long read timeout: FFmpeg blocks on a frozen stream, so only the watchdog can get it going again.
    return Settings(source={"spec": camera.url, "read_timeout_s": read_timeout_s, "reconnect_initial_s": 0.2, "reconnect_max_s": 0.5})


def test_watchdog_restarts_a_frozen_camera(camera):
    running = Running(stream_settings(camera), WatchdogSettings(source_stall_s=1.5, check_interval_s=0.2, max_restarts=2))
    try:
        assert isinstance(running.pipeline.source, RestartableSource)
        running.frames_flow("frames from the camera")
        read_before = running.pipeline.source.stats.read
        camera.freeze()
        wait_for(lambda: running.restarts("source") >= 1, "the watchdog to restart the frozen source")
        running.frames_flow("frames through the restarted source")
        assert running.pipeline.source.stats.read > read_before, "the restarted source counts on, never from zero"
        wait_for(lambda: running.health.check()[0], "health back")
        assert running.restarts("inference") == 0
        assert running.errored == []
    finally:
        running.close()


class SourcesSeen:
    """An observer noting which source each frame came from."""

    def __init__(self):
        self.last: str | None = None

    def on_frame(self, frame, result, latency_ms):
        self.last = frame.source


def test_watchdog_restarts_the_source_that_replaced_the_first(camera):
    """A source replaced while running (as a Greengrass configuration change does) is the one the watchdog
    reopens when it freezes, not the one the agent started with."""
    second = MjpegCamera().start()
    seen = SourcesSeen()
    running = Running(stream_settings(camera), WatchdogSettings(source_stall_s=1.5, check_interval_s=0.2, max_restarts=2), blocker=seen)
    try:
        running.frames_flow("frames from the first camera")
        running.pipeline.replace_source(stream_settings(second).source)
        wait_for(lambda: seen.last == second.url, "frames from the second camera")
        camera.stop()  # the first camera is gone for good: reopening it could never bring frames back
        second.freeze()
        wait_for(lambda: running.restarts("source") >= 1, "the watchdog to restart the frozen second camera")
        running.frames_flow("frames through the restarted second camera")
        assert seen.last == second.url and running.errored == []
    finally:
        running.close()
        second.stop()


def test_watchdog_reports_errored_when_restarts_do_not_help_and_clears_it(camera):
    running = Running(stream_settings(camera, read_timeout_s=2), WatchdogSettings(source_stall_s=1, check_interval_s=0.2, max_restarts=2))
    try:
        running.frames_flow("frames from the camera")
        camera.stop()
        wait_for(lambda: running.errored, "ERRORED after restarts that could not open the camera", timeout=90)
        assert running.restarts("source") >= 2
        ok, reason = running.health.check()
        assert not ok and reason == running.errored[0]
        assert "source stuck" in reason and "restart failed" in reason and camera.url in reason
        camera.start()
        running.frames_flow("frames once the camera is back")
        wait_for(lambda: running.health.check()[0], "the fault cleared once frames flow")
        assert len(running.errored) == 1
        # What the status topic was told: degraded (with the reason) once, then online again.
        wait_for(lambda: running.health_changes[-1][0], "the recovery to be reported")
        assert (False, running.errored[0]) in running.health_changes
    finally:
        running.close()


class Hang:
    """An observer that holds the pipeline thread while `hold` is set: a frame that never finishes."""

    def __init__(self):
        self.hold = threading.Event()
        self.release = threading.Event()

    def on_frame(self, frame, result, latency_ms):
        if self.hold.is_set():
            self.release.wait(60)


def test_watchdog_gives_stuck_inference_a_fresh_interpreter():
    hang = Hang()
    settings = Settings(source={"spec": str(SAMPLE_VIDEO), "loop": True, "pace_fps": 30})
    running = Running(settings, WatchdogSettings(inference_stall_s=1, source_stall_s=30, check_interval_s=0.2), blocker=hang)
    try:
        running.frames_flow("frames from the video")
        stuck = running.pipeline.slot.active
        hang.hold.set()
        wait_for(lambda: running.restarts("inference") >= 1, "the watchdog to restart inference")
        fresh = running.pipeline.slot.active
        assert fresh is not stuck and fresh.backend is not stuck.backend
        assert fresh.ref == stuck.ref, "the same model, on a new backend"
        hang.hold.clear()
        hang.release.set()
        running.frames_flow("frames on the fresh interpreter")
        assert running.restarts("source") == 0 and running.errored == []
    finally:
        hang.release.set()
        running.close()


def test_update_attempts_are_counted_by_outcome_and_reason():
    pipeline = build_pipeline(Settings(), ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter("test"))
    health = Health(pipeline, 10)
    counted = Metrics(pipeline, "console", health)
    counted.count_update("SUCCEEDED")
    counted.count_update("failed", "SHA256_MISMATCH")
    with pytest.raises(ValueError, match="not one of"):
        counted.count_update("exploded")
    exposed = {
        (sample.labels["outcome"], sample.labels["reason"]): sample.value
        for family in text_string_to_metric_families(counted.exposition().decode())
        if family.name == "edge_agent_model_update_attempts"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert exposed == {("succeeded", ""): 1, ("failed", ""): 0, ("rejected", ""): 0, ("failed", "SHA256_MISMATCH"): 1}
    assert health.check() == (False, f"no frame from {pipeline.source.name} yet")
    pipeline.source.close()


def test_busy_port_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "--liveview", "--liveview-port", port, "--max-frames", "5")
    assert result.returncode == 2
    # (The console transport writes its status messages to stderr too; the error is the one other line.)
    errors = [line for line in result.stderr.strip().splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and f"liveview: cannot listen on 127.0.0.1:{port}" in errors[0] and "--liveview-port" in errors[0]
