"""`edge-agent bench`: the figures the product promises, measured on this device and printed as JSON.

- invoke: one model invoke (set input, invoke, get output), the configured threads, p50/p99 in us;
- frame: find digits + classify them + build the result on real decoded frames (decode excluded), ms;
- paced: the agent as a separate process reading the source at a camera's 30 fps: CPU % of one core,
  resident memory, and the time from process start to its first published result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from agent.app import build_pipeline, load_configured_model
from agent.errors import SourceError
from agent.inference.evaluate import invoke_latency_us
from agent.inference.pipeline import frame_settings
from agent.inference.tasks.base import Task
from agent.messages import SequenceCounter
from agent.settings import Settings
from agent.sources import open_source
from agent.transport.console import ConsoleTransport

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _percentiles(samples: list[float], scale: float) -> dict[str, float]:
    values = np.asarray(samples) * scale
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3), "n": len(values)}


def bench_invoke(settings: Settings) -> dict:
    """One invoke of the first frame's first input through the configured backend."""
    model = load_configured_model(settings)
    frames = read_frames(settings, 30, model.task)
    inputs = next((prepared.invokes[0] for frame in frames if (prepared := model.task.prepare(frame.image)).invokes), None)
    if inputs is None:
        raise SourceError(f"source {settings.source.spec}: the model found nothing to run on in its first {len(frames)} frames; bench a source it sees something in")
    p50, p99 = invoke_latency_us(model.backend.run, inputs, repeats=5000)
    return {"backend": model.backend.name, "device": model.backend.device, "p50": round(p50, 1), "p99": round(p99, 1), "unit": "us"}


def read_frames(settings: Settings, count: int, task: Task) -> list:
    """The configured source's first frames as the task reads them, decoded up front (so decode is never measured)."""
    source = open_source(frame_settings(settings.source, task))
    frames = []
    while len(frames) < count and (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    return frames


def bench_frame(settings: Settings, max_frames: int = 300, rounds: int = 3) -> dict:
    """Per-frame cost on the configured source's frames, decoded up front so decode is excluded (the
    pipeline's own source stays unread)."""
    pipeline = build_pipeline(settings, ConsoleTransport(), SequenceCounter(settings.thing_name), publish_empty=True)
    try:
        frames = read_frames(settings, max_frames, pipeline.slot.active.task)
        samples, found = [], []
        for _ in range(rounds):
            for frame in frames:
                start = time.perf_counter()
                result = pipeline.process(frame)
                samples.append(time.perf_counter() - start)
                found.append(len(result.predictions))
    finally:
        pipeline.source.close()
    return {**_percentiles(samples, 1e3), "unit": "ms", "frame_size": list(frames[0].image.shape[1::-1]), "max_predictions_per_frame": max(found), "mean_predictions_per_frame": round(float(np.mean(found)), 2)}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def _memory_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def measure_process(pid: int, seconds: float) -> dict:
    """CPU (% of one core) over `seconds`, then resident and peak memory, of a running process, via /proc."""
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    cpu1, t1 = _cpu_seconds(pid), time.perf_counter()
    return {
        "cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "rss_mb": round(_memory_kb(pid, "VmRSS") / 1024, 1),
        "peak_rss_mb": round(_memory_kb(pid, "VmHWM") / 1024, 1),
    }


def bench_paced(settings: Settings, seconds: float, fps: float = 30.0) -> dict:
    """Run the agent as its own process at a camera's rate; measure it from outside, through /proc."""
    command = [sys.executable, "-m", "agent", "run", "--source", settings.source.spec, "--model", str(settings.model.bundle), "--loop", "--pace-fps", str(fps)]
    for key in settings.model.trusted_keys:
        command += ["--trusted-key", str(key)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        first_line = process.stdout.readline()
        first_result_s = time.perf_counter() - start
        if not first_line:
            raise RuntimeError("the agent ended before publishing a result")
        # Drain stdout on a thread so the agent never blocks on a full pipe while we measure.
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
        time.sleep(1.0)  # past start-up
        measured = measure_process(process.pid, seconds)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return {"fps": fps, **measured, "start_to_first_result_s": round(first_result_s, 3)}


def run_bench(settings: Settings, seconds: float = 10.0) -> dict:
    return {
        "invoke": bench_invoke(settings),
        "frame": bench_frame(settings),
        "paced_30fps": bench_paced(settings, seconds),
        "model": str(settings.model.bundle),
        "source": settings.source.spec,
    }
