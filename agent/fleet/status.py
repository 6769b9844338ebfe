"""`edge-fleet fleet status`: every device's model, last update job and last sign of life, in one table.

Read from AWS's own records: the model version each agent reports in its classic shadow
(`reported.model.version`), its newest job execution and the reason the agent gave in `statusDetails`, and
when it was last heard from (the shadow's newest reported timestamp, or fleet indexing's connectivity
record where that is enabled). Requests for different devices run side by side; boto3 clients are
thread-safe. `--watch` redraws the table with plain ANSI codes until the rollout settles.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from agent.fleet.aws import Aws, CloudError

FAILED = {"FAILED", "TIMED_OUT", "REJECTED"}
PENDING = {"QUEUED", "IN_PROGRESS"}
WORKERS = 8


@dataclass
class Device:
    thing: str
    model_version: str | None = None
    job_id: str | None = None
    job_status: str | None = None
    reason: str | None = None
    last_seen: str | None = None  # ISO 8601 UTC
    connected: bool | None = None  # None: fleet indexing of connectivity is not enabled
    shadow: str | None = None  # the newest job's shadow evaluation: "candidate version: agreement"

    @property
    def failed(self) -> bool:
        return self.job_status in FAILED


@dataclass
class FleetStatus:
    devices: list[Device]

    @property
    def versions(self) -> dict[str, int]:
        return dict(sorted(Counter(device.model_version or "unknown" for device in self.devices).items()))

    @property
    def failed(self) -> list[Device]:
        return [device for device in self.devices if device.failed]

    @property
    def settled(self) -> bool:
        return not any(device.job_status in PENDING for device in self.devices)

    def as_json(self) -> dict[str, Any]:
        return {"devices": [asdict(device) for device in self.devices], "versions": self.versions, "failed": len(self.failed)}


def iso_time(epoch_seconds: float | None) -> str | None:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if epoch_seconds else None


def newest_timestamp(metadata: Any) -> float | None:
    """The latest `timestamp` anywhere in a shadow's metadata (each reported leaf carries its own)."""
    if isinstance(metadata, dict):
        stamps = [metadata["timestamp"]] if isinstance(metadata.get("timestamp"), (int, float)) else []
        stamps += [stamp for value in metadata.values() if (stamp := newest_timestamp(value)) is not None]
        return max(stamps, default=None)
    return None


def thing_names(aws: Aws, group: str | None) -> list[str]:
    if group:
        fix = f"thing group {group!r} not found; check the name (`aws iot list-thing-groups`)"
        aws.call("iot", "describe_thing_group", thingGroupName=group, fix=fix)
        return sorted(aws.pages("iot", "list_things_in_thing_group", "things", thingGroupName=group, recursive=True))
    return sorted(thing["thingName"] for thing in aws.pages("iot", "list_things", "things"))


def connectivity(aws: Aws, group: str | None) -> dict[str, dict[str, Any]]:
    """thing -> {connected, timestamp (ms)} from fleet indexing; empty when indexing is not enabled."""
    query = f"thingGroupNames:{group}" if group else "thingName:*"
    things: list[dict[str, Any]] = []
    token: dict[str, str] = {}
    try:
        while True:
            reply = aws.call("iot", "search_index", queryString=query, **token)
            things += reply.get("things", [])
            if not reply.get("nextToken"):
                break
            token = {"nextToken": reply["nextToken"]}
    except CloudError:
        return {}
    return {thing["thingName"]: thing["connectivity"] for thing in things if "connectivity" in thing}


def device_status(aws: Aws, thing: str, connection: dict[str, Any] | None) -> Device:
    device = Device(thing)
    seen: list[float] = []
    shadow = aws.exists("iot-data", "get_thing_shadow", thingName=thing)
    if shadow is not None:
        document = json.loads(shadow["payload"].read())
        model = document.get("state", {}).get("reported", {}).get("model") or {}
        device.model_version = model.get("version") if isinstance(model, dict) else None
        if (stamp := newest_timestamp(document.get("metadata", {}).get("reported"))) is not None:
            seen.append(stamp)
    executions = aws.pages("iot", "list_job_executions_for_thing", "executionSummaries", thingName=thing)
    if executions:
        newest = max(executions, key=lambda e: e["jobExecutionSummary"].get("lastUpdatedAt") or e["jobExecutionSummary"].get("queuedAt"))
        execution = aws.call("iot", "describe_job_execution", jobId=newest["jobId"], thingName=thing)["execution"]
        details = (execution.get("statusDetails") or {}).get("detailsMap") or {}
        device.job_id, device.job_status = newest["jobId"], execution["status"]
        device.reason = " ".join(filter(None, (details.get("reason"), details.get("message")))) or None
        if "agreement" in details:  # a shadow evaluation's figures, so far (IN_PROGRESS) or final
            device.shadow = f"{details.get('candidate', '?')}: {details['agreement']}{' promoted' if details.get('promoted') == 'true' else ''}"
    if connection:
        device.connected = bool(connection.get("connected"))
        if not device.connected and connection.get("timestamp"):
            seen.append(connection["timestamp"] / 1000)
    device.last_seen = iso_time(max(seen, default=None))
    return device


def fleet_status(aws: Aws, group: str | None) -> FleetStatus:
    things = thing_names(aws, group)
    connections = connectivity(aws, group)
    for service in ("iot", "iot-data"):
        aws.client(service)  # made once here, then shared by the worker threads
    with ThreadPoolExecutor(WORKERS) as pool:
        devices = list(pool.map(lambda thing: device_status(aws, thing, connections.get(thing)), things))
    return FleetStatus(devices)


COLUMNS = (("THING", "thing"), ("MODEL", "model_version"), ("JOB", "job_id"), ("STATUS", "job_status"), ("SHADOW", "shadow"), ("LAST SEEN", "last_seen"), ("REASON", "reason"))


def render(status: FleetStatus, colour: bool = False) -> str:
    """The status table, then counts per model version and failures."""
    rows = [[str(getattr(device, field) or "-") for _, field in COLUMNS] for device in status.devices]
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, (title, _) in enumerate(COLUMNS)]
    lines = ["  ".join(title.ljust(width) for (title, _), width in zip(COLUMNS, widths)).rstrip()]
    for device, row in zip(status.devices, rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        lines.append(f"\x1b[31m{line}\x1b[0m" if colour and device.failed else line)
    versions = ", ".join(f"{version}: {count}" for version, count in status.versions.items()) or "none"
    count = len(status.devices)
    lines.append(f"{count} device{'' if count == 1 else 's'}; models {versions}; failed: {len(status.failed)}")
    return "\n".join(lines)


def watch(aws: Aws, group: str | None, interval: float, out: TextIO = sys.stdout) -> FleetStatus:
    """Redraw the table every `interval` seconds until no device has a queued or running job."""
    live = out.isatty()
    while True:
        status = fleet_status(aws, group)
        stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
        frame = f"edge-fleet status{' --group ' + group if group else ''}  (updated {stamp} UTC)\n{render(status, live)}"
        out.write(("\x1b[H\x1b[2J" if live else "") + frame + "\n")
        out.flush()
        if status.settled:
            return status
        time.sleep(interval)
