"""Fleet simulation: N real agent processes, one model update rolled out to all of them, some downloads corrupted.

    .venv/bin/python tests/fleet_sim.py --devices 100 --corrupt 3 --fps 1        (`make fleet-sim`)

One Mosquitto with mutual TLS and the policy ACL stands in for IoT Core, with the Jobs/Shadow test service
(tests/iot_service.py) answering on it; a local HTTPS server stands in for S3. Each device is a real
`edge-agent run --transport mqtt` process with its own certificate, settings file, outbox and model store,
serving the sample video at --fps (2 by default; `make fleet-sim` runs a hundred at 1, which two cores hold), niced so that the stand-ins
for AWS's side (broker, Jobs service) keep their share of the machine. The release is made by the
operator's own code (agent.fleet.publish: zip, verify, sign, the signed model-update document); the job goes
to every device as a group job does, paced and judged by the stand-in with the operator's own rollout
settings (agent.fleet.rollout.Rollout: exponential rate, maximum per minute, abort criteria), and the URL
IoT Core would presign replaced by the artifact server's. --corrupt devices, spread through the fleet, get
a copy with flipped bytes, as a download corrupted in transit.

Checks (exit 1 if any fails), each failure named with its device: every healthy device that was notified
SUCCEEDED and its results show the new version from its swap on (never the old one after); each corrupted
one FAILED with SHA256_MISMATCH and still serves the old model; a device the job never reached (aborted)
serves the old model; shadows report what each device serves. Prints the figures as JSON: devices updated
and failed (each with its reason and message, the model its results show it serves, its agent's log), seconds from the job to the
last healthy device on the new version, the rollout's rate steps, CPU and memory (RSS, PSS, USS) per agent
process, results per second, broker messages per second, and the operator's status table.

Shadow-then-promote (a new model evaluated beside the serving one before it takes over) is not simulated:
the agent does not have it yet.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
from agent.fleet.rollout import Rollout  # noqa: E402
from agent.fleet.status import Device, FleetStatus, iso_time, newest_timestamp, render  # noqa: E402
from agent.messages import unbatch  # noqa: E402
from agent.settings import DEV_SIGNING_KEY, SHIPPED_BUNDLE, validate_settings  # noqa: E402

JOB_ID = "fleet-sim-model-update"
AGENT_NICENESS = 10
# Fast enough that a hundred devices are notified within half a minute: 60/min at first, doubling after
# every 10 successes, at most 1000/min; cancel when 20% of at least 20 finished devices failed (a corrupted
# download fails within a second, a good update takes seconds, so failures come first among the finished).
SIM_ROLLOUT = Rollout(base_rate_per_minute=60, increment_factor=2.0, increase_after_succeeded=10, maximum_per_minute=1000, abort_threshold_percent=20, abort_min_devices=20)
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

    def total(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def count(self, thing: str) -> int:
        """Results seen from the thing so far (cheap: a watcher polls it for a hundred things)."""
        with self.lock:
            return len(self.versions[thing])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def memory_mb(pid: int) -> dict[str, float]:
    """RSS, PSS (shared pages split between the processes sharing them) and USS (this process's alone), MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def spread(things: list[str], count: int) -> set[str]:
    """`count` of the things, evenly through the list (so the rollout meets them early, midway and late)."""
    return {things[round((i + 1) * len(things) / (count + 1)) - 1] for i in range(count)}


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
    # At a low frame rate the health window is counted in fewer frames: five frames are 2.5 s at 2 fps.
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
        "updates": {"store": str(folder / "models"), "health_frames": max(5, min(30, int(fps * 3))), "download": {"ca_file": str(artifact_ca)}},
    }
    validate_settings(values, f"{thing} settings")
    path = folder / "agent.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def wait(condition, what: str, timeout_s: float, processes: dict[str, subprocess.Popen], give_up: bool = True) -> float | None:
    """Seconds until `condition()` held; stops early (with the agent's exit) if an agent died. On timeout:
    exits, or with give_up=False returns None (the report then names the devices that did not finish)."""
    start = time.monotonic()
    while not condition():
        for thing, process in processes.items():
            if process.poll() is not None:
                raise SystemExit(f"fleet-sim: agent {thing} exited with {process.returncode} while waiting for {what}")
        if time.monotonic() - start > timeout_s:
            if give_up:
                raise SystemExit(f"fleet-sim: timed out after {timeout_s:.0f} s waiting for {what}")
            return None
        time.sleep(0.25)
    return time.monotonic() - start


def simulate(devices: int, corrupt: int, fps: float, measure_s: float, timeout_s: float, folder: Path, rollout: Rollout = SIM_ROLLOUT) -> dict:
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
    things = [f"sim-{n:03d}" for n in range(1, devices + 1)]
    bad = spread(things, corrupt)
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
                # Agents run niced: on one machine a hundred of them would otherwise starve the stand-ins for
                # IoT Core (broker, Jobs) that in the field run on AWS's side, not the devices'.
                processes[thing] = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=home, env=agent_env(), preexec_fn=lambda: os.nice(AGENT_NICENESS))
            startup = wait(lambda: all(results.count(t) for t in things), "every device's first result", timeout_s, processes)

            # Steady state before the update: CPU, memory, result rate per agent process, broker traffic.
            before = {t: (cpu_seconds(p.pid), results.count(t)) for t, p in processes.items()}
            messages_before = results.total()
            time.sleep(measure_s)
            cpu = {t: 100 * (cpu_seconds(p.pid) - before[t][0]) / measure_s for t, p in processes.items()}
            rate = {t: (results.count(t) - before[t][1]) / measure_s for t in things}
            steady_messages_per_s = (results.total() - messages_before) / measure_s
            memory = {t: memory_mb(p.pid) for t, p in processes.items()}

            # The rollout: one job for the group, paced and judged by the rollout's own settings.
            messages_before = results.total()
            rollout_start = time.monotonic()
            job = service.create_job(JOB_ID, things, lambda thing: {**document, "url": urls[thing in bad]}, rollout.job_configuration())
            finished: dict[str, float] = {}

            def settled() -> bool:
                over = job.status != "IN_PROGRESS"  # read first: every notification came before it
                statuses = service.statuses(JOB_ID)
                for thing, status in statuses.items():
                    if thing not in finished and status in TERMINAL:
                        finished[thing] = time.monotonic() - rollout_start
                return over and len(finished) == len(statuses)

            settle_s = wait(settled, "the rollout to finish", timeout_s, processes, give_up=False)
            rollout_messages_per_s = (results.total() - messages_before) / (settle_s or timeout_s)
            marks = {thing: results.count(thing) for thing in things}
            wait(lambda: all(results.count(t) >= marks[t] + max(1, int(fps)) for t in things), "a second of results after the rollout", timeout_s, processes)
            executions = {thing: service.execution(thing, JOB_ID) for thing in things}
            shadows = {thing: service.shadows.get(thing) for thing in things}
            counts = dict(results.counts)
            versions = {thing: results.snapshot(thing) for thing in things}
            notified = service.notified(JOB_ID)
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
    problems, failures, table = [], {}, []
    for thing in things:
        execution, seen, shadow = executions[thing], versions[thing], shadows[thing]
        reported = ((shadow.state.get("reported") or {}).get("model") or {}).get("version") if shadow else None
        status = execution.status if execution else None
        reason = execution.status_details.get("reason") if execution else None
        if status in ("QUEUED", "IN_PROGRESS"):
            problems.append(f"{thing}: still {status} when the rollout should have finished ({execution.status_details})")
            expected = (seen[-1] if seen else old, status, reason)
        elif status is None or status == "CANCELED":
            expected = (old, status, None)  # the job never reached it (aborted first)
        elif thing in bad:
            expected = (old, "FAILED", "SHA256_MISMATCH")
        else:
            expected = (new, "SUCCEEDED", None)
        after = seen[marks[thing] :]
        if (status, reason) != expected[1:]:
            problems.append(f"{thing}: job {status} {reason}, expected {expected[1]} {expected[2]}")
        if thing in bad and new in seen:
            problems.append(f"{thing}: served {new} although its download was corrupted")
        swapped = seen[seen.index(new) :] if new in seen else []
        if expected[0] == new and (not swapped or old in swapped):
            problems.append(f"{thing}: results after its swap are not all {new}")
        if not after or set(after) != {expected[0]}:
            problems.append(f"{thing}: results after the rollout show {sorted(set(after))}, expected {expected[0]}")
        if reported != expected[0]:
            problems.append(f"{thing}: shadow reports model {reported}, expected {expected[0]}")
        if status not in (None, "SUCCEEDED"):
            failures[thing] = {
                "status": status,
                "reason": reason,
                "message": execution.status_details.get("message"),
                "serving": after[-1] if after else None,  # what its results said after the rollout
                "agent_log": str(folder / "devices" / thing / "agent.log"),
            }
        last_seen = iso_time(newest_timestamp(shadow.metadata.get("reported"))) if shadow else None
        table.append(Device(thing, reported, JOB_ID if execution else None, status, " ".join(filter(None, (reason, execution.status_details.get("message") if execution else None))) or None, last_seen))
    if settle_s is None:
        problems.insert(0, f"the rollout did not finish within {timeout_s:.0f} s: job {job.status}, {len(notified)} of {devices} devices notified")
    connections = (folder / "broker" / "mosquitto.log").read_text().count("New client connected")
    healthy_done = [finished[t] for t in things if t not in bad and executions[t] and executions[t].status == "SUCCEEDED"]
    took = [finished[t] - (notified[t] - rollout_start) for t in finished]
    return {
        "devices": devices,
        "fps_asked": fps,
        "rollout": {**rollout.model_dump(), "job_status": job.status, "abort_reason": job.abort_reason, "rates_per_minute": [round(r, 1) for r in job.rates], "notified": len(notified)},
        "updated": sum(1 for e in executions.values() if e and e.status == "SUCCEEDED"),
        "failed": {t: f["reason"] for t, f in failures.items() if f["status"] == "FAILED"},
        "failures": failures,
        "startup_s": round(startup, 1),
        "converged_s": round(max(healthy_done), 2) if healthy_done else None,
        "settled_s": round(settle_s, 2) if settle_s is not None else None,
        "update_s_per_device": {"median": round(sorted(took)[len(took) // 2], 2), "max": round(max(took), 2)} if took else None,
        "per_agent": {
            "cpu_percent_mean": round(sum(cpu.values()) / devices, 1),
            "cpu_percent_max": round(max(cpu.values()), 1),
            "rss_mb_mean": round(sum(m["rss"] for m in memory.values()) / devices, 1),
            "rss_mb_max": round(max(m["rss"] for m in memory.values()), 1),
            "pss_mb_mean": round(sum(m["pss"] for m in memory.values()) / devices, 1),
            "uss_mb_mean": round(sum(m["uss"] for m in memory.values()) / devices, 1),
            "results_per_s_mean": round(sum(rate.values()) / devices, 2),
            "results_per_s_min": round(min(rate.values()), 2),
        },
        "machine_cpus": os.cpu_count(),
        "broker": {
            "connections": connections,
            "messages_per_s_steady": round(steady_messages_per_s, 1),
            "messages_per_s_rollout": round(rollout_messages_per_s, 1),
            "messages_by_kind": counts,
            "messages": sum(counts.values()),
        },
        "run_s": round(time.monotonic() - started, 1),
        "status_table": render(FleetStatus(table)).splitlines(),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--corrupt", type=int, default=3, help="devices whose download is corrupted (spread through the fleet)")
    parser.add_argument("--fps", type=float, default=2.0, help="frame rate each agent serves the sample video at")
    for name, value in SIM_ROLLOUT.model_dump().items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=type(value), default=value, help=f"rollout: {Rollout.model_fields[name].description} (default {value})")
    parser.add_argument("--measure", type=float, default=10.0, help="seconds of steady state measured before the rollout")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for any phase")
    parser.add_argument("--keep", type=Path, help="keep the devices' folders and logs here")
    args = parser.parse_args(argv)
    if not 0 <= args.corrupt < args.devices:
        parser.error("--corrupt must be at least 0 and below --devices")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: still stop every agent and the broker
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        folder = args.keep or Path(tmp)
        rollout = Rollout.model_validate({name: getattr(args, name) for name in Rollout.model_fields})
        report = simulate(args.devices, args.corrupt, args.fps, args.measure, args.timeout, folder, rollout)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
