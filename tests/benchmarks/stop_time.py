"""Benchmark (not a test; pytest does not collect it): how long `edge-agent run --transport mqtt` takes to stop
against a broker that answers neither IoT Jobs nor the Device Shadow (plain Mosquitto, mutual TLS, no stand-in).

    .venv/bin/python tests/benchmarks/stop_time.py [--runs 5] [--frames 30]

Prints JSON figures, each over `--runs` runs (median and worst), in seconds:
- `sigterm_s`, `sigint_s`: from the signal to the process's exit, while serving the sample video at 30 fps
  with its Jobs and Shadow requests unanswered (the goal is 5 s; systemd's TimeoutStopSec is 15 s);
- `max_frames_s`: from the retained online status to the exit of a `--max-frames N` run;
- `offline_sent`: runs whose offline status (reason "stopped") reached a subscriber.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the broker fixtures

from broker import Mosquitto, Observer, Pki  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
THING = "bench-stop"
STATUS = f"edge/{THING}/status"


def agent(broker: Mosquitto, device, outbox: Path, *args: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "agent", "run", "--transport", "mqtt", "--thing-name", THING, "--endpoint", "127.0.0.1",
        "--port", str(broker.port), "--cert", str(device.cert), "--key", str(device.key), "--ca", str(broker.pki.ca.path), *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_OUTBOX__PATH"] = str(outbox)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)


def states(observer: Observer) -> list[tuple[str, str | None]]:
    return [(m["state"], m.get("reason")) for m in (json.loads(r.payload) for r in observer.on(STATUS))]


def one_stop(broker: Mosquitto, pki: Pki, device, folder: Path, run: int, how: str, frames: int) -> tuple[float, bool]:
    """Seconds from the signal (or from `online`, for a --max-frames run) to the exit; whether `offline` arrived."""
    with Observer(broker, pki, client_id=f"bench-watch-{how}-{run}") as observer:
        observer.subscribe(STATUS)
        args = ["--max-frames", str(frames)] if how == "max_frames" else ["--loop", "--pace-fps", "30"]
        process = agent(broker, device, folder / f"outbox-{how}-{run}.db", *args)
        try:
            observer.wait_for(lambda ms: ("online", None) in states(observer), timeout_s=60)
            if how != "max_frames":
                time.sleep(1.0)  # serving, its Jobs and Shadow requests sent and unanswered
                process.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
            start = time.monotonic()
            process.wait(timeout=120)
            elapsed = time.monotonic() - start
        finally:
            process.kill()
            process.wait()
        observer.wait_for(lambda ms: ("offline", "stopped") in states(observer), timeout_s=5)
        return elapsed, ("offline", "stopped") in states(observer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=30)
    options = parser.parse_args()
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pki = Pki.create(folder / "pki")
        device = pki.client(THING)
        with Mosquitto(folder / "broker", pki) as broker:
            for how in ("sigterm", "sigint", "max_frames"):
                times, offline = [], 0
                for run in range(options.runs):
                    elapsed, sent = one_stop(broker, pki, device, folder, run, how, options.frames)
                    times.append(elapsed)
                    offline += sent
                figures[f"{how}_s"] = {"median": round(statistics.median(times), 2), "worst": round(max(times), 2), "offline_sent": f"{offline}/{options.runs}"}
    print(json.dumps({"broker": "mosquitto without Jobs or Shadow", "runs": options.runs, **figures}, indent=2))


if __name__ == "__main__":
    main()
