"""What the live view costs the pipeline: per-frame cost with it disabled, enabled with nobody watching,
and enabled with one viewer on /stream.mjpg. Prints JSON; asserts nothing (not collected by pytest).

    .venv/bin/python tests/benchmarks/liveview_cost.py [--seconds 4] [--fps 30] [--rounds 5]

The pipeline processes decoded sample frames at a camera's rate (`--fps`) on this thread, exactly as
`Pipeline.run` would; the HTTP server, and the viewer reading the stream, run on their own threads in
this process, so their CPU and GIL contention land in the figures. Configurations alternate round by
round so drift on a shared machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import threading
import time
import urllib.request

import numpy as np

from agent.app import build_pipeline
from agent.bench import read_frames
from agent.messages import SequenceCounter
from agent.observe.liveview import LiveView, LiveViewServer
from agent.observe.metrics import Health, Metrics
from agent.settings import LiveViewSettings, Settings
from agent.transport.console import ConsoleTransport


def paced(pipeline, frames, seconds: float, fps: float) -> dict:
    """Process frames at `fps` for `seconds`: per-frame cost (ms) and this process's CPU (% of one core)."""
    samples, period = [], 1.0 / fps
    cpu0, start = time.process_time(), time.perf_counter()
    due = start
    while time.perf_counter() - start < seconds:
        frame = frames[len(samples) % len(frames)]
        began = time.perf_counter()
        pipeline.process(frame)
        samples.append(time.perf_counter() - began)
        due += period
        time.sleep(max(due - time.perf_counter(), 0))
    elapsed = time.perf_counter() - start
    return {"samples_ms": [s * 1e3 for s in samples], "cpu_s": time.process_time() - cpu0, "elapsed_s": elapsed}


class Viewer:
    """One browser's worth of stream: reads /stream.mjpg as fast as the server sends it."""

    def __init__(self, url: str):
        self._response = urllib.request.urlopen(url + "stream.mjpg", timeout=10)
        self.parts = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while chunk := self._response.read(65536):
                self.parts += chunk.count(b"--frame\r\n")
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._response.close()


def run(configuration: str, settings: Settings, frames, seconds: float, fps: float) -> dict:
    pipeline = warm_pipeline(settings, frames)
    server = viewer = None
    if configuration != "disabled":
        health = Health(pipeline, 10.0)
        metrics = Metrics(pipeline, "console", health)
        server = LiveViewServer(pipeline, LiveViewSettings(enabled=True, port=0), metrics, health).start()
        pipeline.add_observer(metrics)
        pipeline.add_observer(server.view)
        if configuration == "one viewer":
            viewer = Viewer(server.url)
    try:
        figures = paced(pipeline, frames, seconds, fps)
    finally:
        if viewer is not None:
            viewer.close()
        if server is not None:
            figures["frames_encoded"] = server.view.frames_encoded
            server.close()
    return figures


def warm_pipeline(settings: Settings, frames):
    """A fresh pipeline (no observers) whose caches and interpreter have seen 30 frames (its own source stays unread)."""
    pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter("bench"))
    for frame in frames[:30]:
        pipeline.process(frame)
    return pipeline


def encode_cost(pipeline, frames) -> dict:
    """What one viewer's frame costs the HTTP thread: draw the annotations and encode the JPEG, ms."""
    view = LiveView(pipeline, LiveViewSettings(enabled=True))
    samples = []
    for frame in frames:
        view.on_frame(frame, pipeline.process(frame), 2.0)
        began = time.perf_counter()
        view.jpeg(view.latest)
        samples.append((time.perf_counter() - began) * 1e3)
    return {"p50_ms": round(float(np.percentile(samples, 50)), 3), "p99_ms": round(float(np.percentile(samples, 99)), 3), "n": len(samples)}


def summarise(runs: list[dict]) -> dict:
    samples = np.concatenate([r["samples_ms"] for r in runs])
    cpu = sum(r["cpu_s"] for r in runs) / sum(r["elapsed_s"] for r in runs)
    summary = {
        "frames": len(samples),
        "mean_ms": round(float(samples.mean()), 3),
        "p50_ms": round(float(np.percentile(samples, 50)), 3),
        "p99_ms": round(float(np.percentile(samples, 99)), 3),
        "p50_ms_per_round": [round(float(np.percentile(r["samples_ms"], 50)), 3) for r in runs],
        "process_cpu_percent_of_one_core": round(100 * cpu, 1),
    }
    if "frames_encoded" in runs[0]:
        summary["encoded_fps"] = round(sum(r["frames_encoded"] for r in runs) / sum(r["elapsed_s"] for r in runs), 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    parser.add_argument("--fps", type=float, default=30.0, help="camera rate the frames are processed at")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each configuration, alternating")
    args = parser.parse_args()

    settings = Settings()  # the shipped model and sample video
    frames = read_frames(settings, 10_000)

    configurations = ("disabled", "enabled, no viewer", "one viewer")
    runs: dict[str, list[dict]] = {name: [] for name in configurations}
    for _ in range(args.rounds):
        for name in configurations:
            runs[name].append(run(name, settings, frames, args.seconds, args.fps))
    results = {name: summarise(r) for name, r in runs.items()}
    for name in configurations[1:]:
        for figure in ("mean_ms", "p50_ms"):
            change = 100 * (results[name][figure] / results["disabled"][figure] - 1)
            results[name][figure.replace("_ms", "_change_percent")] = round(change, 1)
    results["annotate_and_encode_per_streamed_frame"] = encode_cost(warm_pipeline(settings, frames), frames)
    print(json.dumps({"model": str(settings.model.bundle), "source": settings.source.spec, "fps": args.fps,
                      "seconds_per_run": args.seconds, "rounds": args.rounds, "cpus": os.cpu_count(), **results}, indent=2))


if __name__ == "__main__":
    main()
