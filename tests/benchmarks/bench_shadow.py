"""CPU a shadow evaluation adds: the agent serving the sample video camera-paced at 30 fps, alone and with an
identical candidate evaluated in shadow on every Nth frame. Prints JSON; asserts nothing (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_shadow.py [--rounds 3] [--seconds 10] [--every-nth 3]

- agent_cpu_pct: the whole process (decode, task, backend, results to a console transport on /dev/null), % of
  one core, median of the rounds; alone and with shadow. Rounds alternate so a noisy neighbour hits both alike.
- model_cpu_pct: the serving model alone (task + backend time per frame x frames per second), the
  "single-model cost"; added_vs_model = the shadow's added CPU over it (the goal: at most 0.60 at every 3rd frame).
- frames_dropped / frames_lost: serving frames a live source dropped or the pipeline skipped during the shadow runs.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

from agent.app import load_configured_model  # noqa: E402
from agent.inference.pipeline import Pipeline, Tuning  # noqa: E402
from agent.inference.slot import ModelSlot  # noqa: E402
from agent.messages import SequenceCounter  # noqa: E402
from agent.settings import Settings, SourceSettings  # noqa: E402
from agent.transport.console import ConsoleTransport  # noqa: E402
from agent.updates.shadow import ShadowPlan, ShadowRun, ShadowTap  # noqa: E402

VIDEO = REPO / "models" / "mnist" / "sample" / "sample.avi"


class Served:
    """Frame indices and time in the model, seen from the pipeline thread."""

    def __init__(self):
        self.indices: list[int] = []
        self.model_ms = 0.0

    def on_frame(self, frame, result, latency_ms):
        self.indices.append(frame.index)
        self.model_ms += latency_ms


def one_round(seconds: float, every_nth: int | None) -> dict:
    settings = Settings(source=SourceSettings(spec=str(VIDEO), loop=True, pace_fps=30))
    sink = io.StringIO()
    pipeline = Pipeline(settings.source, ModelSlot(load_configured_model(settings)), ConsoleTransport(sink, sink), SequenceCounter("bench"), Tuning())
    served = Served()
    pipeline.add_observer(served)
    tap = ShadowTap(lambda: pipeline.tuning.score_threshold)
    pipeline.add_observer(tap)
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    time.sleep(1.5)  # start-up (model load, first frames) is not what is measured
    run = None
    if every_nth:
        run = ShadowRun(load_configured_model(settings), ShadowPlan(frames=10**9, seconds=seconds, every_nth=every_nth, cpu_budget=0.5, stall_s=10.0))
        tap.run = run
    first, cpu, wall, model_ms = len(served.indices), time.process_time(), time.monotonic(), served.model_ms
    if run is not None:
        figures = run.run(lambda figures, percent: None)
    else:
        time.sleep(seconds)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    frames, model_ms = len(served.indices) - first, served.model_ms - model_ms
    pipeline.stop()
    thread.join(10)
    indices = served.indices
    out = {
        "agent_cpu_pct": 100 * cpu / wall,
        "model_cpu_pct": 100 * model_ms / 1e3 / wall,
        "fps": frames / wall,
        "frames_dropped": pipeline.source.stats.dropped,
        "frames_lost": (indices[-1] - indices[0] + 1) - len(indices),
    }
    if run is not None:
        out |= {"shadow_frames": figures.frames, "shadow_skipped": figures.frames_skipped, "agreement": figures.agreement, "latency_ratio": figures.latency_ratio}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--every-nth", type=int, default=3)
    args = parser.parse_args()
    alone, shadow = [], []
    for _ in range(args.rounds):
        alone.append(one_round(args.seconds, None))
        shadow.append(one_round(args.seconds, args.every_nth))
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    model = median(alone, "model_cpu_pct")
    added = median(shadow, "agent_cpu_pct") - median(alone, "agent_cpu_pct")
    print(json.dumps({
        "every_nth": args.every_nth,
        "fps": round(median(alone, "fps"), 1),
        "agent_cpu_pct": {"alone": round(median(alone, "agent_cpu_pct"), 2), "with_shadow": round(median(shadow, "agent_cpu_pct"), 2)},
        "model_cpu_pct": round(model, 2),
        "shadow_added_cpu_pct": round(added, 2),
        "added_vs_model": round(added / model, 3),
        "added_vs_agent": round(added / median(alone, "agent_cpu_pct"), 3),
        "shadow_frames_per_round": median(shadow, "shadow_frames"),
        "shadow_skipped_per_round": median(shadow, "shadow_skipped"),
        "agreement": median(shadow, "agreement"),
        "latency_ratio": round(median(shadow, "latency_ratio"), 3),
        "frames_dropped": sum(r["frames_dropped"] for r in shadow),
        "frames_lost": sum(r["frames_lost"] for r in shadow),
        "rounds": args.rounds,
        "seconds": args.seconds,
    }, indent=2))


if __name__ == "__main__":
    main()
