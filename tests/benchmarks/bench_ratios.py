"""The agent against its peers, as ratios measured in one sitting (absolute times differ 2x between machines).
Prints JSON; asserts nothing (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_ratios.py [--rounds 3] [--seconds 10]

- per_frame: the agent's per-frame cost (task + backend + result, decode excluded) on the sample video,
  against ../shared/reference/plain_digit_reader.py (a plain OpenCV + TFLite script, decode excluded too)
  on the same video and the same model file; p50 of each, and plain / agent.
- cpu_30fps: CPU (% of one core, via /proc) of the agent run camera-paced at 30 fps on the sample video,
  against loops that only decode the same frames to grey at 30 fps: with OpenCV's VideoCapture + cvtColor
  (what a user would write) and with the agent's own grey JPEG decode (its source, nothing else);
  agent / decode-only. Rounds alternate so a noisy neighbour hits every contender alike.
- rss_mb: the agent's resident memory at 30 fps with one backend loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PLAIN_READER = REPO.parent / "shared" / "reference" / "plain_digit_reader.py"

from agent.bench import bench_frame, measure_process  # noqa: E402
from agent.settings import Settings  # noqa: E402


def decode_only(video: str, fps: float, own_decoder: bool) -> None:
    """The baseline process: decode every frame to grey at `fps`, looping, and nothing else."""
    import cv2

    from agent.sources import VideoFileSource

    period, tick = 1.0 / fps, time.monotonic()
    while True:
        if own_decoder:
            source = VideoFileSource(Path(video))
            while source.read() is not None:
                tick = pace(tick, period)
            source.close()
        else:
            capture = cv2.VideoCapture(video)
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
                tick = pace(tick, period)
            capture.release()


def pace(tick: float, period: float) -> float:
    tick += period
    delay = tick - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    return max(tick, time.monotonic() - period)


def plain_per_frame_ms(model: Path, video: str) -> float:
    result = subprocess.run([sys.executable, str(PLAIN_READER), str(model), video], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stderr.strip().splitlines()[-1])["per_frame_ms_p50"]


def measured(command: list[str], seconds: float) -> dict:
    """CPU and memory of a process over `seconds`, after a second of start-up; its stdout drained and dropped."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
        time.sleep(2.0)
        return measure_process(process.pid, seconds)
    finally:
        process.terminate()
        process.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="CPU measuring window of each paced run")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--decode-only", choices=["opencv", "agent"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings()
    video = settings.source.spec
    if args.decode_only:
        decode_only(video, args.fps, own_decoder=args.decode_only == "agent")
        return

    agent_ms, plain_ms = [], []
    cpu: dict[str, list[float]] = {"agent": [], "decode_opencv": [], "decode_agent": []}
    rss: list[float] = []
    contenders = {
        "agent": [sys.executable, "-m", "agent", "run", "--source", video, "--loop", "--pace-fps", str(args.fps)],
        "decode_opencv": [sys.executable, __file__, "--decode-only", "opencv", "--fps", str(args.fps)],
        "decode_agent": [sys.executable, __file__, "--decode-only", "agent", "--fps", str(args.fps)],
    }
    for _ in range(args.rounds):
        agent_ms.append(bench_frame(settings, rounds=2)["p50"])
        plain_ms.append(plain_per_frame_ms(settings.model.bundle / "model.tflite", video))
        for name, command in contenders.items():
            figures = measured(command, args.seconds)
            cpu[name].append(figures["cpu_percent_of_one_core"])
            if name == "agent":
                rss.append(figures["rss_mb"])
    median = statistics.median
    print(json.dumps({
        "per_frame": {
            "agent_p50_ms": agent_ms, "plain_reader_p50_ms": plain_ms,
            "plain_over_agent": round(median(plain_ms) / median(agent_ms), 2),
        },
        "cpu_30fps": {
            "percent_of_one_core": cpu,
            "agent_over_decode_opencv": round(median(cpu["agent"]) / median(cpu["decode_opencv"]), 2),
            "agent_over_decode_agent": round(median(cpu["agent"]) / median(cpu["decode_agent"]), 2),
        },
        "rss_mb": rss,
        "model": str(settings.model.bundle), "video": video, "rounds": args.rounds,
    }, indent=2))


if __name__ == "__main__":
    main()
