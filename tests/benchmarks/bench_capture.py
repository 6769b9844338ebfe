"""What data capture costs: per kept frame (JPEG encode + durable spool write), and upload throughput from the
spool to S3 (moto in server mode on loopback: the agent's side of the work, not a real network). Prints JSON;
asserts nothing (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_capture.py [--frames 200] [--quality 85]

- kept_frame_ms: thread CPU and wall time per kept 640x480 grey frame of the sample video (p50, p99), and
  the capture's bytes on disk.
- upload: captures per second and MB/s through the Uploader (botocore S3 client with credentials from the
  token exchange service stand-in), the same captures.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))  # the stand-ins in tests/

from credentials_provider import ContainerCredentials  # noqa: E402

from agent.capture.capturer import Capturer, Kept  # noqa: E402
from agent.capture.spool import CaptureSpool  # noqa: E402
from agent.capture.uploader import Uploader  # noqa: E402
from agent.cloud.credentials import credential_provider, s3_client  # noqa: E402
from agent.messages import ModelRef  # noqa: E402
from agent.settings import CaptureSettings, CredentialSettings, MqttSettings, SourceSettings  # noqa: E402
from agent.sources import open_source  # noqa: E402

VIDEO = REPO / "models" / "mnist" / "sample" / "sample.avi"
MODEL = ModelRef(name="mnist-int8", version="1.0.0", sha256="0" * 64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50": round(statistics.median(ordered), 3), "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        with tempfile.TemporaryDirectory() as tmp, ContainerCredentials() as tes:
            settings = CaptureSettings(enabled=True, jpeg_quality=args.quality, spool=Path(tmp) / "spool", bucket="bench", region="us-east-1", s3_endpoint_url=f"http://127.0.0.1:{port}", max_per_day=10**6)
            spool = CaptureSpool(settings.spool, max_per_day=settings.max_per_day, max_bytes=10**10, max_age_s=86400)
            capturer = Capturer(settings, "bench-thing", spool, lambda: MODEL, lambda: 0.5)
            source = open_source(SourceSettings(spec=str(VIDEO), loop=True))
            cpu_ms, wall_ms = [], []
            for _ in range(args.frames):
                frame = source.read()
                started, cpu = time.perf_counter(), time.thread_time()
                spool.add(*capturer.encode(Kept(frame, "random", 0.5, MODEL, [])))
                cpu_ms.append((time.thread_time() - cpu) * 1e3)
                wall_ms.append((time.perf_counter() - started) * 1e3)
            source.close()
            waiting = spool.stats.waiting_bytes

            environ = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": tes.uri, "AWS_CONTAINER_AUTHORIZATION_TOKEN": tes.token}
            provider = credential_provider(CredentialSettings(source="greengrass"), MqttSettings(), "bench-thing", environ=environ)
            client = s3_client(provider, settings.region, settings.s3_endpoint_url)
            client.create_bucket(Bucket="bench")
            uploader = Uploader(spool, settings, lambda: client)
            started = time.perf_counter()
            sent = uploader.send_waiting()
            elapsed = time.perf_counter() - started
            print(json.dumps({
                "frame": "640x480 grey (sample video)",
                "jpeg_quality": args.quality,
                "kept_frame_cpu_ms": percentiles(cpu_ms),
                "kept_frame_wall_ms": percentiles(wall_ms),
                "bytes_per_capture": round(waiting / args.frames),
                "upload": {"captures": sent, "captures_per_s": round(sent / elapsed, 1), "mb_per_s": round(spool.stats.uploaded_bytes / elapsed / 1e6, 2), "at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            }, indent=2))
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
