"""Model update speed and smoothness: IoT Job notification -> new model serving, and frames around the swap.
Prints JSON; asserts nothing (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_update.py [--runs 5] [--health-frames 30]

Real parts on localhost: Mosquitto with mutual TLS, the IoT Jobs stand-in (tests/iot_service.py), the
agent's MQTT5 link with IotJobsClientV2, an HTTPS artifact server, and a pipeline serving the sample video
at a camera's 30 fps. Each run queues a job for a new version of the shipped bundle (re-signed by a key
made here, ~90 KB zip) and measures:
- notify_to_serving_s: from the job being queued (IoT publishes notify-next) to the first result made by
  the new model (download, sha256, signature, hashes, runtime load, tensor check, golden set, swap);
- notify_to_succeeded_s: to the execution's SUCCEEDED (adds the health window: --health-frames frames);
- frames_dropped: frame numbers missing from the results during the run (the pipeline must see every frame);
- max_gap_ms: largest time between two consecutive results while the update ran (33 ms is one frame at 30 fps).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from artifact_server import serve  # noqa: E402
from broker import Mosquitto, Pki  # noqa: E402
from iot_service import IotService  # noqa: E402
from update_helpers import Serving, document, later, make_bundle  # noqa: E402

from agent.bundles.signing import generate_key  # noqa: E402
from agent.cloud.jobs import JobRunner  # noqa: E402
from agent.settings import MqttSettings  # noqa: E402
from agent.transport.mqtt import MqttLink  # noqa: E402

THING = "bench-thing"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--health-frames", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp:
        tmp = Path(tmp)
        generate_key(tmp / "op.key", tmp / "op.pub")
        pki = Pki.create(tmp / "pki")
        artifacts, stop_artifacts = serve(tmp)
        bundles = tmp / "bundles"
        bundles.mkdir()
        with Mosquitto(tmp / "mosquitto", pki) as broker, IotService(broker, pki) as service:
            device = pki.client(THING)
            link = MqttLink(MqttSettings(endpoint="127.0.0.1", port=broker.port, cert=device.cert, key=device.key, ca=pki.ca.path, flow_control="none"), client_id=THING)
            link.connect(timeout_s=10)
            serving = Serving(tmp / "store", [tmp / "op.pub"], artifacts.ca_file, health_frames=args.health_frames)
            runner = JobRunner(link.client, THING, serving.manager, timeout_s=10)
            runner.start()
            runs = []
            for run in range(1, args.runs + 1):
                version = later(run)
                data = make_bundle(bundles, tmp / "op.key", version=version)
                doc = document(artifacts.publish(f"/bench/{version}.zip", data), data, version=version)
                first_frame = len(serving.log.frames)
                queued = time.monotonic()
                service.queue_job(THING, f"bench-{run}", doc)
                while service.execution(THING, f"bench-{run}").status in ("QUEUED", "IN_PROGRESS"):
                    time.sleep(0.002)
                succeeded = time.monotonic()
                serving.wait_frames(5)
                frames, times = serving.log.frames[first_frame:], serving.log.times[first_frame:]
                served = next(t for (_, v), t in zip(frames, times) if v == version)
                indices = [index for index, _ in frames]
                runs.append({
                    "status": service.execution(THING, f"bench-{run}").status,
                    "bundle_bytes": len(data),
                    "notify_to_serving_s": round(served - queued, 3),
                    "notify_to_succeeded_s": round(succeeded - queued, 3),
                    "frames": len(frames),
                    "frames_dropped": (indices[-1] - indices[0] + 1) - len(indices),
                    "max_gap_ms": round(max(b - a for a, b in zip(times, times[1:])) * 1000, 1),
                })
            runner.close()
            serving.stop()
            del runner
            gc.collect()
            client = link.client  # kept until exit: awscrt may still call into a stopped client
            link.close()
        stop_artifacts()
    summary = {
        "runs": runs,
        "notify_to_serving_s_median": statistics.median(r["notify_to_serving_s"] for r in runs),
        "notify_to_serving_s_max": max(r["notify_to_serving_s"] for r in runs),
        "notify_to_succeeded_s_median": statistics.median(r["notify_to_succeeded_s"] for r in runs),
        "frames_dropped_total": sum(r["frames_dropped"] for r in runs),
        "max_gap_ms": max(r["max_gap_ms"] for r in runs),
        "health_frames": args.health_frames,
        "pace_fps": 30,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
