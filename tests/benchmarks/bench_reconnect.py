"""Time from a dropped stream's return to the agent's next result. Prints JSON; asserts nothing (not
collected by pytest).

    .venv/bin/python tests/benchmarks/bench_reconnect.py [--down 10] [--rounds 3] [--set KEY=VALUE ...]

The agent runs as a process (`edge-agent run`, console transport) on an IP camera served by this script:
the sample video as multipart JPEG over HTTP at 15 fps, read by OpenCV's FFmpeg like a real camera. Each
round the camera goes away (its server closes every connection and the port refuses) for `--down` seconds
plus a fraction of a second spread evenly over the rounds, so the camera's return falls at every point
between two of the agent's probes; then it comes back on the same port. The figure is the time from the
server listening again to the next inference result on the agent's stdout. `--set source.reconnect_max_s=30`
measures other settings.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from agent_process import stop_process  # noqa: E402
from conftest import REPO, agent_env  # noqa: E402
from mjpeg_camera import MjpegCamera  # noqa: E402


def results_of(process: subprocess.Popen) -> queue.SimpleQueue:
    """(monotonic time, result) for each inference result the agent prints, as it prints it."""
    arrivals: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        for line in process.stdout:
            if line.startswith("{") and json.loads(line).get("kind") == "inference":
                arrivals.put(time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    return arrivals


def next_after(arrivals: queue.SimpleQueue, moment: float, timeout: float) -> float | None:
    """Seconds from `moment` to the first result after it (None if none within `timeout`)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            arrived = arrivals.get(timeout=left)
        except queue.Empty:
            break
        if arrived > moment:
            return arrived - moment
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--down", type=float, default=10.0, help="seconds the camera is away each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for the agent, e.g. source.reconnect_max_s=30")
    args = parser.parse_args()
    env = agent_env(**{"EDGE_AGENT_" + key.replace(".", "__").upper(): value for key, value in (item.split("=", 1) for item in args.set)})

    camera = MjpegCamera().start()
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--source", camera.url],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env,
    )
    seconds = []
    try:
        arrivals = results_of(agent)
        if next_after(arrivals, 0.0, timeout=60) is None:
            raise SystemExit("no result from the agent within 60 s")
        for round_ in range(args.rounds):
            camera.stop()
            time.sleep(args.down + round_ / args.rounds)
            camera.start()
            seconds.append(next_after(arrivals, time.monotonic(), timeout=120))
    finally:
        stop_process(agent)
        camera.stop()
    measured = [s for s in seconds if s is not None]
    print(json.dumps({
        "down_s": args.down,
        "settings": args.set,
        "return_to_next_result_s": [round(s, 2) if s is not None else None for s in seconds],
        "max_s": round(max(measured), 2) if measured else None,
    }, indent=2))


if __name__ == "__main__":
    main()
