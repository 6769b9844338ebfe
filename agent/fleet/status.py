"""`edge-fleet fleet status`: every device's model, last update job and last sign of life, in one table.

Read from AWS's own records: the model version each agent reports in its classic shadow
(`reported.model.version`), its job execution and the reason the agent gave in `statusDetails`, and when it
was last heard from (the shadow's newest reported timestamp, or fleet indexing's connectivity record). A
shadow evaluation's figures come from the job's `statusDetails`, and device by device also from the agent's
retained status message (GetRetainedMessage), which has them however the candidate was sent (IoT Jobs or
a Greengrass deployment).

Two ways to read them. With fleet indexing on (registry and shadow; `edge-fleet cloud deploy
--fleet-indexing`), the requests do not grow with the fleet per device: SearchIndex pages of 500 things
(shadow and connectivity included), the rollout's executions in pages of 250 (ListJobExecutionsForJob), one
DescribeJobExecution per failed device for its reason, and for `--watch` only counts: GetStatistics,
GetBucketsAggregation over the reported model version, and DescribeJob's rollout counts. With indexing off
(or not ready) it falls back to four requests per device, side by side (boto3 clients are thread-safe).
`--watch` shows a progress bar of the rollout until it settles, then its failures.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from agent.fleet.aws import Aws, CloudError
from agent.settings import TopicSettings
from agent.topics import Topics

FAILED = {"FAILED", "TIMED_OUT", "REJECTED"}
WORKERS = 8
SEARCH_PAGE = 500  # SearchIndex's largest page
EXECUTIONS_PAGE = 250  # ListJobExecutionsForJob's largest page
VERSION_FIELD = "shadow.reported.model.version"
# What SearchIndex and friends answer while indexing is off, still building, or without the shadow.
INDEX_OFF = {"IndexNotReadyException", "ResourceNotFoundException", "InvalidRequestException", "InvalidQueryException", "IndexingDisabledException"}
# DescribeJob's jobProcessDetails, as the rollout's counts.
PROCESS_COUNTS = {
    "succeeded": "numberOfSucceededThings",
    "failed": "numberOfFailedThings",
    "rejected": "numberOfRejectedThings",
    "timed_out": "numberOfTimedOutThings",
    "canceled": "numberOfCanceledThings",
    "removed": "numberOfRemovedThings",
    "in_progress": "numberOfInProgressThings",
    "queued": "numberOfQueuedThings",
}
log = logging.getLogger(__name__)


@dataclass
class Device:
    thing: str
    model_version: str | None = None
    job_id: str | None = None
    job_status: str | None = None
    reason: str | None = None
    last_seen: str | None = None  # ISO 8601 UTC
    connected: bool | None = None  # None: fleet indexing of connectivity is not enabled
    shadow: str | None = None  # the newest shadow evaluation: "candidate version: agreement [state] [(frames, latency ratio)]"

    @property
    def failed(self) -> bool:
        return self.job_status in FAILED


@dataclass
class FleetStatus:
    devices: list[Device]
    source: str = "per-device"  # or "fleet-index"

    @property
    def versions(self) -> dict[str, int]:
        return dict(sorted(Counter(device.model_version or "unknown" for device in self.devices).items()))

    @property
    def failed(self) -> list[Device]:
        return [device for device in self.devices if device.failed]

    def as_json(self) -> dict[str, Any]:
        return {"devices": [asdict(device) for device in self.devices], "versions": self.versions, "failed": len(self.failed), "source": self.source}


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
        return sorted(aws.pages("iot", "list_things_in_thing_group", "things", thingGroupName=group, recursive=True))
    return sorted(thing["thingName"] for thing in aws.pages("iot", "list_things", "things"))


def device_status(aws: Aws, thing: str, job: str | None = None) -> Device:
    """One device from its shadow, its newest job execution, or its execution of `job` (a third request for
    its statusDetails), and its retained status (a fourth, for a shadow evaluation's figures)."""
    device = Device(thing)
    shadow = aws.exists("iot-data", "get_thing_shadow", thingName=thing)
    if shadow is not None:
        document = json.loads(shadow["payload"].read())
        model = document.get("state", {}).get("reported", {}).get("model") or {}
        device.model_version = model.get("version") if isinstance(model, dict) else None
        device.last_seen = iso_time(newest_timestamp(document.get("metadata", {}).get("reported")))
    summaries = aws.pages("iot", "list_job_executions_for_thing", "executionSummaries", thingName=thing)
    summaries = [summary for summary in summaries if job in (None, summary["jobId"])]
    if summaries:
        newest = max(summaries, key=lambda e: e["jobExecutionSummary"].get("lastUpdatedAt") or e["jobExecutionSummary"].get("queuedAt"))
        device.job_id, device.job_status = newest["jobId"], newest["jobExecutionSummary"]["status"]
        read_details(device, execution_details(aws, device.job_id, thing))
    figures = retained_shadow(aws, thing)
    if figures is not None:  # the device's own, newest view of the evaluation
        device.shadow = shadow_text(
            figures["candidate"]["version"], _figure(figures.get("agreement")), " ".join(filter(None, (figures["state"], figures.get("reason")))),
            figures.get("frames"), _figure(figures.get("latency_ratio")),
        )
    return device


def retained_shadow(aws: Aws, thing: str) -> dict[str, Any] | None:
    """The shadow evaluation figures in the device's retained status message, if it carries any."""
    retained = aws.exists("iot-data", "get_retained_message", topic=Topics.for_thing(TopicSettings(), thing).status)
    try:
        figures = json.loads(retained["payload"]).get("shadow") if retained else None
    except (ValueError, AttributeError):  # not an agent's status message
        return None
    return figures if isinstance(figures, dict) and isinstance(figures.get("candidate"), dict) else None


def _figure(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"  # as in statusDetails


def shadow_text(candidate: str, agreement: str | None, state: str | None = None, frames: Any = None, latency_ratio: str | None = None) -> str:
    """The SHADOW column: "1.1.0: 0.9833 running (60 frames, latency x1.0312)", with what is known."""
    text = f"{candidate}: {agreement or '-'}" + (f" {state}" if state else "")
    if frames is not None:
        text += f" ({frames} frames" + (f", latency x{latency_ratio}" if latency_ratio else "") + ")"
    return text


def per_device_status(aws: Aws, group: str | None, job: str | None = None) -> FleetStatus:
    """Four requests per device (shadow, executions, the newest one's details, the retained status): fine
    for tens of devices."""
    things = thing_names(aws, group)
    for service in ("iot", "iot-data"):
        aws.client(service)  # made once here, then shared by the worker threads
    with ThreadPoolExecutor(WORKERS) as pool:
        devices = list(pool.map(lambda thing: device_status(aws, thing, job), things))
    return FleetStatus(devices)


def index_query(group: str | None) -> str:
    return f"thingGroupNames:{group}" if group else "thingName:*"


def indexed(aws: Aws) -> bool:
    """Fleet indexing holds the things and their classic shadows (the model version is in the shadow)."""
    try:
        config = aws.call("iot", "get_indexing_configuration")["thingIndexingConfiguration"]
    except CloudError as error:
        if error.code in INDEX_OFF:
            return False
        raise
    return config.get("thingIndexingMode") == "REGISTRY_AND_SHADOW"


def indexed_device(thing: dict[str, Any]) -> Device:
    """A SearchIndex thing: its classic shadow comes as a JSON string (reported, metadata, version, hasDelta)."""
    device = Device(thing["thingName"])
    shadow = json.loads(thing.get("shadow") or "{}")
    model = (shadow.get("reported") or {}).get("model") or {}
    device.model_version = model.get("version") if isinstance(model, dict) else None
    seen = [stamp] if (stamp := newest_timestamp((shadow.get("metadata") or {}).get("reported"))) is not None else []
    connection = thing.get("connectivity")
    if connection:
        device.connected = bool(connection.get("connected"))
        if not device.connected and connection.get("timestamp"):
            seen.append(connection["timestamp"] / 1000)
    device.last_seen = iso_time(max(seen, default=None))
    return device


def search(aws: Aws, group: str | None) -> list[Device]:
    """Every thing of the group from the index: one request per page of 500."""
    devices: list[Device] = []
    token: dict[str, str] = {}
    while True:
        reply = aws.call("iot", "search_index", queryString=index_query(group), maxResults=SEARCH_PAGE, **token)
        devices += [indexed_device(thing) for thing in reply.get("things", [])]
        if not reply.get("nextToken"):
            return devices
        token = {"nextToken": reply["nextToken"]}


def newest_job(aws: Aws, group: str | None) -> str | None:
    """The rollout: the newest job aimed at the group (or at anything, without a group)."""
    jobs = aws.pages("iot", "list_jobs", "jobs", **({"thingGroupName": group} if group else {}))
    return max(jobs, key=lambda job: job["createdAt"])["jobId"] if jobs else None


def execution_details(aws: Aws, job: str, thing: str) -> dict[str, str]:
    """The statusDetails the agent reported for its execution of `job`."""
    execution = aws.call("iot", "describe_job_execution", jobId=job, thingName=thing)["execution"]
    return (execution.get("statusDetails") or {}).get("detailsMap") or {}


def read_details(device: Device, details: dict[str, str]) -> None:
    """A failure's reason, and a shadow evaluation's figures (so far, IN_PROGRESS, or final)."""
    if device.failed:
        device.reason = " ".join(filter(None, (details.get("reason"), details.get("message")))) or None
    if "agreement" in details:
        promoted = "promoted" if details.get("promoted") == "true" else None
        device.shadow = shadow_text(details.get("candidate", "?"), details["agreement"], promoted, details.get("frames"), details.get("latency_ratio"))


def executions(aws: Aws, job: str, status: str | None = None) -> dict[str, str]:
    """thing -> execution status of the job: one request per page of 250."""
    pages = aws.pages("iot", "list_job_executions_for_job", "executionSummaries", jobId=job, maxResults=EXECUTIONS_PAGE, **({"status": status} if status else {}))
    return {summary["thingArn"].rsplit("/", 1)[1]: summary["jobExecutionSummary"]["status"] for summary in pages}


def indexed_status(aws: Aws, group: str | None, job: str | None) -> FleetStatus:
    devices = search(aws, group)
    job = job or newest_job(aws, group)
    if job:
        statuses = executions(aws, job)
        for device in devices:
            if device.thing in statuses:
                device.job_id, device.job_status = job, statuses[device.thing]
                if device.failed:  # one request per failure (a shadow evaluation's figures: device by device, without the index)
                    read_details(device, execution_details(aws, job, device.thing))
    return FleetStatus(sorted(devices, key=lambda device: device.thing), source="fleet-index")


def check_group(aws: Aws, group: str | None) -> None:
    if group:
        fix = f"thing group {group!r} not found; check the name (`aws iot list-thing-groups`)"
        aws.call("iot", "describe_thing_group", thingGroupName=group, fix=fix)


def fleet_status(aws: Aws, group: str | None, job: str | None = None) -> FleetStatus:
    """From fleet indexing when it is on, else device by device."""
    check_group(aws, group)
    if indexed(aws):
        try:
            return indexed_status(aws, group, job)
        except CloudError as error:
            if error.code not in INDEX_OFF:
                raise
            log.info("fleet index not usable (%s); asking device by device", error.code)
    return per_device_status(aws, group, job)


@dataclass
class RolloutProgress:
    """One redraw of `--watch`: the rollout's counts and the fleet's model versions."""

    job: str | None
    devices: int
    counts: dict[str, int]
    versions: dict[str, int]
    job_status: str | None = None

    @property
    def finished(self) -> int:
        return sum(count for name, count in self.counts.items() if name not in ("queued", "in_progress"))

    @property
    def settled(self) -> bool:
        """The job is over; or (device by device, or a continuous job) nothing is queued or running any more."""
        if self.job_status in ("COMPLETED", "CANCELED"):
            return True
        idle = not self.counts.get("queued") and not self.counts.get("in_progress")
        return idle if self.job_status is None else idle and self.finished >= self.devices

    def line(self) -> str:
        counts = " ".join(f"{name.replace('_', ' ')} {count}" for name, count in self.counts.items() if count)
        versions = ", ".join(f"{version}: {count}" for version, count in self.versions.items())
        return f"{counts or 'no executions yet'} | models {versions or 'unknown'}"


def indexed_progress(aws: Aws, group: str | None, job: str | None) -> RolloutProgress:
    """Counts only, whatever the fleet's size: GetStatistics, GetBucketsAggregation, DescribeJob."""
    query = index_query(group)
    devices = aws.call("iot", "get_statistics", queryString=query)["statistics"]["count"]
    buckets = aws.call("iot", "get_buckets_aggregation", queryString=query, aggregationField=VERSION_FIELD, bucketsAggregationType={"termsAggregation": {"maxBuckets": 20}})["buckets"]
    versions = dict(sorted((bucket["keyValue"], bucket["count"]) for bucket in buckets))
    if (unknown := devices - sum(versions.values())) > 0:
        versions["unknown"] = unknown
    if not job:
        return RolloutProgress(None, devices, {}, versions)
    described = aws.call("iot", "describe_job", jobId=job)["job"]
    process = described.get("jobProcessDetails") or {}
    return RolloutProgress(job, devices, {name: process.get(key, 0) for name, key in PROCESS_COUNTS.items()}, versions, described.get("status"))


def counted_progress(status: FleetStatus) -> RolloutProgress:
    """The same counts from a device-by-device status (indexing off)."""
    counts = Counter((device.job_status or "none").lower() for device in status.devices if device.job_status)
    job = next((device.job_id for device in status.devices if device.job_id), None)
    return RolloutProgress(job, len(status.devices), {name: counts.get(name, 0) for name in PROCESS_COUNTS}, status.versions)


COLUMNS = (("THING", "thing"), ("MODEL", "model_version"), ("JOB", "job_id"), ("STATUS", "job_status"), ("SHADOW", "shadow"), ("LAST SEEN", "last_seen"), ("REASON", "reason"))


def render(status: FleetStatus, colour: bool = False) -> str:
    """The status table, then counts per model version and failures."""
    rows = [[str(getattr(device, field) or "-") for _, field in COLUMNS] for device in status.devices]
    widths = [max([len(title)] + [len(row[i]) for row in rows]) for i, (title, _) in enumerate(COLUMNS)]
    lines = ["  ".join(title.ljust(width) for (title, _), width in zip(COLUMNS, widths)).rstrip()]
    for device, row in zip(status.devices, rows):
        line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
        lines.append(f"\x1b[31m{line}\x1b[0m" if colour and device.failed else line)
    lines.append(summary(status))
    return "\n".join(lines)


def summary(status: FleetStatus) -> str:
    versions = ", ".join(f"{version}: {count}" for version, count in status.versions.items()) or "none"
    count = len(status.devices)
    return f"{count} device{'' if count == 1 else 's'}; models {versions}; failed: {len(status.failed)}"


def watch(aws: Aws, group: str | None, interval: float, job: str | None = None, out: TextIO = sys.stdout) -> FleetStatus:
    """A progress bar of the rollout, redrawn every `interval` seconds until it settles; then its failures."""
    from tqdm import tqdm

    check_group(aws, group)
    use_index = indexed(aws)
    job = job or newest_job(aws, group)
    bar = None
    while True:
        if use_index:
            progress = indexed_progress(aws, group, job)
        else:
            status = per_device_status(aws, group, job)
            progress = counted_progress(status)
        if bar is None:
            bar = tqdm(total=progress.devices, initial=progress.finished, desc=f"rollout {progress.job or '(no job)'}", unit="device", postfix=progress.line(), file=out, dynamic_ncols=out.isatty())
        bar.total = progress.devices
        bar.n = progress.finished
        bar.set_postfix_str(progress.line(), refresh=False)
        bar.refresh()
        if progress.settled:
            bar.close()
            break
        time.sleep(interval)
    status = indexed_status(aws, group, job) if use_index else status
    for device in status.failed:
        out.write(f"{device.thing}: {device.job_status} {device.reason or ''}".rstrip() + "\n")
    out.write(summary(status) + "\n")
    out.flush()
    return status
