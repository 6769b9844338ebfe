"""Fleet simulation: N real agent processes, one model update rolled out to all of them, some downloads corrupted.

    .venv/bin/python tests/fleet_sim.py --devices 20 --corrupt 2        (`make fleet-sim`)

One Mosquitto with mutual TLS and the policy ACL stands in for IoT Core, with the Jobs/Shadow test service
(tests/iot_service.py) answering on it; a local HTTPS server stands in for S3. Each device is a real
`edge-agent run --transport mqtt` process with its own certificate, settings file, outbox and model store,
serving the sample video at --fps. The release is made by the operator's own code (agent.fleet.publish:
zip, verify, sign, the signed model-update document); the job is queued for every device as a group job
would be, with the URL IoT Core would presign replaced by the artifact server's. The last --corrupt devices
get a copy with flipped bytes, as a download corrupted in transit.

Checks (exit 1 if any fails): every other device SUCCEEDED and its results show the new version from its
swap on (never the old one after); each corrupted one FAILED with SHA256_MISMATCH and still serves the old
model; shadows report what each device serves. Prints the figures as JSON: devices updated and failed, time
until the fleet converged, CPU and memory per agent process, results per second, broker connections and
messages, and the operator's status table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import yaml  # noqa: E402
from artifact_server import serve  # noqa: E402
from broker import Mosquitto, Observer, Pki  # noqa: E402
from conftest import SAMPLE_VIDEO, agent_env  # noqa: E402
from iot_service import TERMINAL, IotService  # noqa: E402

from agent.bundles.signing import generate_key  # noqa: E402
from agent.fleet.packing import write_manifest  # noqa: E402
from agent.fleet.publish import prepare  # noqa: E402
from agent.fleet.status import Device, FleetStatus, iso_time, newest_timestamp, render  # noqa: E402
from agent.messages import unbatch  # noqa: E402
from agent.settings import DEV_SIGNING_KEY, SHIPPED_BUNDLE, validate_settings  # noqa: E402

JOB_ID = "fleet-sim-model-update"
TICK = os.sysconf("SC_CLK_TCK")


class ResultLog(Observer):
    """Which model version each device's results came from, in arrival order (payloads are not kept)."""

    def __init__(self, broker: Mosquitto, pki: Pki):
        super().__init__(broker, pki, client_id="fleet-sim-results")
        self.versions: dict[str, list[str]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)  # messages per topic kind, every device
        self.lock = threading.Lock()

    def _on_message(self, data) -> None:
        packet = data.publish_packet
        parts = packet.topic.split("/")
        with self.lock:
            self.counts["$aws/" + parts[3] if parts[0] == "$aws" else parts[-1]] += 1
            if parts[0] == "edge" and parts[-1] == "inference":
                self.versions[parts[1]].extend(result["model"]["version"] for result in unbatch(packet.payload))

    def snapshot(self, thing: str) -> list[str]:
        with self.lock:
            return list(self.versions[thing])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def new_release(folder: Path, signing_key: Path):
    """The shipped model as the next major version, released with the operator's code."""
    root = folder / "new-bundle"
    shutil.copytree(SHIPPED_BUNDLE, root, ignore=shutil.ignore_patterns("manifest.sig"))
    raw = json.loads((root / "manifest.json").read_text())
    raw.pop("files")
    raw["version"] = f"{int(raw['version'].split('.')[0]) + 1}.0.0"
    write_manifest(root, raw)
    return prepare(root, signing_key, folder, bucket="fleet-sim")


def device_settings(thing: str, folder: Path, broker: Mosquitto, pki: Pki, trusted: Path, artifact_ca: Path, fps: float) -> Path:
    credentials = pki.client(thing)
    values = {
        "thing_name": thing,
        "transport": "mqtt",
        "publish_empty": True,  # one result per frame, so results per second is the frame rate
        "metrics_interval_s": 10,
        "source": {"spec": str(SAMPLE_VIDEO), "loop": True, "pace_fps": fps},
        "model": {"trusted_keys": [str(DEV_SIGNING_KEY), str(trusted)]},
        "mqtt": {"endpoint": "127.0.0.1", "port": broker.port, "cert": str(credentials.cert), "key": str(credentials.key), "ca": str(pki.ca.path), "flow_control": "none"},
        "outbox": {"path": str(folder / "outbox.sqlite3")},
        "updates": {"store": str(folder / "models"), "download": {"ca_file": str(artifact_ca)}},
    }
    validate_settings(values, f"{thing} settings")
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def wait(condition, what: str, timeout_s: float, processes: dict[str, subprocess.Popen]) -> float:
    """Seconds until `condition()` held; stops early (with the agent's exit) if an agent died."""
    start = time.monotonic()
    while not condition():
        for thing, process in processes.items():
            if process.poll() is not None:
                raise SystemExit(f"fleet-sim: agent {thing} exited with {process.returncode} while waiting for {what}")
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"fleet-sim: timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def simulate(devices: int, corrupt: int, fps: float, measure_s: float, timeout_s: float, folder: Path) -> dict:
    pki = Pki.create(folder / "pki")
    broker = Mosquitto(folder / "broker", pki).start()
    (folder / "artifacts").mkdir(parents=True)
    artifacts, stop_artifacts = serve(folder / "artifacts")
    generate_key(folder / "fleet.key", folder / "fleet.pub")
    artifact, release = new_release(folder, folder / "fleet.key")
    data = artifact.read_bytes()
    corrupted = bytearray(data)
    corrupted[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    urls = {False: artifacts.publish("/models/bundle.zip", data), True: artifacts.publish("/corrupted/bundle.zip", bytes(corrupted))}
    document = release.document("us-east-1").model_dump(mode="json", exclude_none=True)
    things = [f"sim-{n:02d}" for n in range(1, devices + 1)]
    bad = set(things[devices - corrupt :])
    processes: dict[str, subprocess.Popen] = {}
    logs = []
    try:
        with IotService(broker, pki) as service, ResultLog(broker, pki) as results:
            for topic in ("edge/#", "$aws/things/+/jobs/#", "$aws/things/+/shadow/#"):
                results.subscribe(topic)
            started = time.monotonic()
            for thing in things:
                home = folder / "devices" / thing
                home.mkdir(parents=True)
                config = device_settings(thing, home, broker, pki, folder / "fleet.pub", artifacts.ca_file, fps)
                log = open(home / "agent.log", "w")
                logs.append(log)
                command = [sys.executable, "-m", "agent", "run", "--config", str(config)]
                processes[thing] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=home, env=agent_env())
            startup = wait(lambda: all(results.snapshot(t) for t in things), "every device's first result", timeout_s, processes)

            # Steady state before the update: CPU, memory and result rate per agent process.
            before = {t: (cpu_seconds(p.pid), len(results.snapshot(t))) for t, p in processes.items()}
            time.sleep(measure_s)
            cpu = {t: 100 * (cpu_seconds(p.pid) - before[t][0]) / measure_s for t, p in processes.items()}
            rate = {t: (len(results.snapshot(t)) - before[t][1]) / measure_s for t in things}
            memory = {t: rss_mb(p.pid) for t, p in processes.items()}

            # The rollout: one job for every device, as a group job; IoT Core would presign the URL.
            rollout_start = time.monotonic()
            for thing in things:
                service.queue_job(thing, JOB_ID, {**document, "url": urls[thing in bad]})
            finished: dict[str, float] = {}

            def settled() -> bool:
                for thing in things:
                    if thing not in finished and service.execution(thing, JOB_ID).status in TERMINAL:
                        finished[thing] = time.monotonic() - rollout_start
                return len(finished) == len(things)

            converged = wait(settled, "every job execution to finish", timeout_s, processes)
            marks = {thing: len(results.snapshot(thing)) for thing in things}
            wait(lambda: all(len(results.snapshot(t)) >= marks[t] + int(fps) for t in things), "a second of results after the rollout", timeout_s, processes)
            executions = {thing: service.execution(thing, JOB_ID) for thing in things}
            shadows = {thing: service.shadows.get(thing) for thing in things}
            counts = dict(results.counts)
            versions = {thing: results.snapshot(thing) for thing in things}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in logs:
            log.close()
        stop_artifacts()
        broker.stop()

    old, new = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["version"], release.version
    problems = []
    table = []
    for thing in things:
        execution, seen, shadow = executions[thing], versions[thing], shadows[thing]
        reported = ((shadow.state.get("reported") or {}).get("model") or {}).get("version") if shadow else None
        reason = execution.status_details.get("reason")
        expected = (old, "FAILED", "SHA256_MISMATCH") if thing in bad else (new, "SUCCEEDED", None)
        after = seen[marks[thing] :]
        if (execution.status, reason) != expected[1:]:
            problems.append(f"{thing}: job {execution.status} {reason}, expected {expected[1]} {expected[2]}")
        if thing in bad and new in seen:
            problems.append(f"{thing}: served {new} although its download was corrupted")
        swapped = seen[seen.index(new) :] if new in seen else []
        if thing not in bad and (not swapped or old in swapped):
            problems.append(f"{thing}: results after its swap are not all {new}")
        if not after or set(after) != {expected[0]}:
            problems.append(f"{thing}: results after the rollout show {sorted(set(after))}, expected {expected[0]}")
        if reported != expected[0]:
            problems.append(f"{thing}: shadow reports model {reported}, expected {expected[0]}")
        last_seen = iso_time(newest_timestamp(shadow.metadata.get("reported"))) if shadow else None
        table.append(Device(thing, reported, JOB_ID, execution.status, " ".join(filter(None, (reason, execution.status_details.get("message")))) or None, last_seen))
    connections = (folder / "broker" / "mosquitto.log").read_text().count("New client connected")
    status = FleetStatus(table)
    return {
        "devices": devices,
        "fps_asked": fps,
        "updated": sum(e.status == "SUCCEEDED" for e in executions.values()),
        "failed": {t: executions[t].status_details.get("reason") for t in things if executions[t].status != "SUCCEEDED"},
        "startup_s": round(startup, 1),
        "converged_s": round(converged, 2),
        "finish_s": {"first": round(min(finished.values()), 2), "median": round(sorted(finished.values())[len(finished) // 2], 2), "last": round(max(finished.values()), 2)},
        "per_agent": {
            "cpu_percent_mean": round(sum(cpu.values()) / devices, 1),
            "cpu_percent_max": round(max(cpu.values()), 1),
            "rss_mb_mean": round(sum(memory.values()) / devices, 1),
            "rss_mb_max": round(max(memory.values()), 1),
            "results_per_s_mean": round(sum(rate.values()) / devices, 1),
            "results_per_s_min": round(min(rate.values()), 1),
        },
        "machine_cpus": os.cpu_count(),
        "broker": {"connections": connections, "messages_by_kind": counts, "messages": sum(counts.values())},
        "run_s": round(time.monotonic() - started, 1),
        "status_table": render(status).splitlines(),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--corrupt", type=int, default=2, help="devices whose download is corrupted")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate each agent serves the sample video at")
    parser.add_argument("--measure", type=float, default=10.0, help="seconds of steady state measured before the rollout")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for any phase")
    parser.add_argument("--keep", type=Path, help="keep the devices' folders and logs here")
    args = parser.parse_args(argv)
    if not 0 <= args.corrupt < args.devices:
        parser.error("--corrupt must be at least 0 and below --devices")
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        folder = args.keep or Path(tmp)
        report = simulate(args.devices, args.corrupt, args.fps, args.measure, args.timeout, folder)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
