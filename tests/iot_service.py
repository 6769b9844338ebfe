"""A stand-in for the AWS IoT Jobs and Device Shadow services, answering on Mosquitto as IoT Core does.

It subscribes to the request topics under `$aws/things/+/jobs/` and `$aws/things/+/shadow/` and replies on
the `/accepted` and `/rejected` topics with IoT Core's payloads: the request's clientToken echoed, version
numbers, job execution state transitions, rejections (InvalidStateTransition, VersionMismatch,
TerminalStateReached, ResourceNotFound; shadow 404 and 409), notify-next when a thing's next pending
execution changes, and shadow delta/documents. The operator's side (queue or cancel a job, set desired
state) is a method call. See /work/shared/reference/aws-iot-protocols.md.

A job for many things (`create_job`) is rolled out as IoT Jobs does with CreateJob's own settings:
`jobExecutionsRolloutConfig` paces the notifications (exponentialRate from baseRatePerMinute, times
incrementFactor each time numberOfNotifiedThings/numberOfSucceededThings more were reached, at most
maximumPerMinute), and `abortConfig` cancels the job once at least minNumberOfExecutedThings finished and the
share of failures of the criterion's type reaches thresholdPercentage: things not yet notified never are,
QUEUED executions become CANCELED, IN_PROGRESS ones finish.

    with IotService(broker, pki) as service:
        service.queue_job("my-thing", "job-1", {"operation": "model-update", ...})
        rollout = service.create_job("job-2", things, document_for, Rollout(...).job_configuration())
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from broker import STOPPED_CLIENTS, Mosquitto, Observer, Pki

TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}
FAILURE_TYPES = {"FAILED": {"FAILED"}, "REJECTED": {"REJECTED"}, "TIMED_OUT": {"TIMED_OUT"}, "ALL": {"FAILED", "REJECTED", "TIMED_OUT"}}
DEVICE_MAY_SET = {"IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"}


def now() -> int:
    return int(time.time())


@dataclass
class Execution:
    job_id: str
    thing: str
    document: dict
    order: int
    status: str = "QUEUED"
    status_details: dict = field(default_factory=dict)
    version: int = 1
    execution_number: int = 1
    queued_at: int = field(default_factory=now)
    started_at: int | None = None
    last_updated_at: int = field(default_factory=now)
    updates: list[dict] = field(default_factory=list)  # every accepted update request, for the tests

    def data(self) -> dict:
        data = {
            "jobId": self.job_id, "thingName": self.thing, "jobDocument": self.document, "status": self.status,
            "statusDetails": self.status_details, "queuedAt": self.queued_at, "lastUpdatedAt": self.last_updated_at,
            "versionNumber": self.version, "executionNumber": self.execution_number,
        }
        if self.started_at is not None:
            data["startedAt"] = self.started_at
        return data

    def state(self) -> dict:
        return {"status": self.status, "statusDetails": self.status_details, "versionNumber": self.version}


@dataclass
class Shadow:
    state: dict = field(default_factory=dict)  # {"desired": {...}, "reported": {...}}
    metadata: dict = field(default_factory=dict)
    version: int = 0


def merge(target: dict, changes: dict) -> None:
    """IoT's shadow merge: nested dicts merge key by key; null deletes; anything else replaces."""
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        elif isinstance(value, dict):
            target[key] = {}
            merge(target[key], value)
        else:
            target[key] = value


def delta(desired: dict, reported: dict) -> dict:
    out = {}
    for key, value in desired.items():
        if isinstance(value, dict) and isinstance(reported.get(key), dict):
            inner = delta(value, reported[key])
            if inner:
                out[key] = inner
        elif key not in reported or reported[key] != value:
            out[key] = value
    return out


def stamps(changes: dict, at: int) -> dict:
    return {k: stamps(v, at) if isinstance(v, dict) else {"timestamp": at} for k, v in changes.items()}


@dataclass
class RolloutJob:
    """A job for many things, notified at the rollout's rate until done or aborted (see the module docstring)."""

    job_id: str
    things: list[str]
    document_for: Callable[[str], dict]
    configuration: dict
    status: str = "IN_PROGRESS"
    notified_at: dict[str, float] = field(default_factory=dict)  # thing -> time.monotonic() of its notification
    rates: list[float] = field(default_factory=list)  # notifications per minute, each step
    abort_reason: str | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class IotService(Observer):
    """IoT Jobs + classic Device Shadow for any thing, over the test broker (the all-topics identity)."""

    def __init__(self, broker: Mosquitto, pki: Pki):
        super().__init__(broker, pki, client_id="iot-service")
        self.executions: dict[str, dict[str, Execution]] = {}
        self.shadows: dict[str, Shadow] = {}
        self._lock = threading.RLock()
        self._order = 0
        self.jobs: dict[str, RolloutJob] = {}
        self._closed = False

    def __enter__(self) -> "IotService":
        super().__enter__()
        self.subscribe("$aws/things/+/jobs/#")
        self.subscribe("$aws/things/+/shadow/#")
        return self

    def __exit__(self, *exc) -> None:
        self._closed = True
        for job in self.jobs.values():
            job.wake.set()
        super().__exit__(*exc)
        STOPPED_CLIENTS.append(self.client)

    # -- the operator's side -----------------------------------------------------------------------------

    def queue_job(self, thing: str, job_id: str, document: dict) -> Execution:
        with self._lock:
            before = self._next(thing)
            self._order += 1
            execution = Execution(job_id, thing, document, self._order)
            self.executions.setdefault(thing, {})[job_id] = execution
            self._notify_if_changed(thing, before)
            return execution

    def create_job(self, job_id: str, things: list[str], document_for: Callable[[str], dict], configuration: dict) -> RolloutJob:
        """CreateJob for `things` (a group's members, in order) with CreateJob's rollout and abort settings."""
        job = RolloutJob(job_id, list(things), document_for, configuration)
        self.jobs[job_id] = job
        threading.Thread(target=self._roll_out, args=(job,), name=f"rollout-{job_id}", daemon=True).start()
        return job

    def _roll_out(self, job: RolloutJob) -> None:
        rollout = job.configuration.get("jobExecutionsRolloutConfig") or {}
        exponential = rollout.get("exponentialRate")
        maximum = rollout.get("maximumPerMinute", 1000)
        rate = min(exponential["baseRatePerMinute"], maximum) if exponential else maximum
        criteria = (exponential or {}).get("rateIncreaseCriteria") or {}
        job.rates.append(rate)
        since_step = {"notified": 0, "succeeded": self._succeeded(job)}
        next_at = time.monotonic()
        for thing in job.things:
            while (delay := next_at - time.monotonic()) > 0 and not self._stopping(job):
                job.wake.wait(delay)
            if self._stopping(job):
                break
            with self._lock:
                if job.status != "IN_PROGRESS":
                    break
                self.queue_job(thing, job.job_id, job.document_for(thing))
                job.notified_at[thing] = time.monotonic()
            since_step["notified"] += 1
            if exponential and rate < maximum and (
                ("numberOfNotifiedThings" in criteria and since_step["notified"] >= criteria["numberOfNotifiedThings"])
                or ("numberOfSucceededThings" in criteria and self._succeeded(job) - since_step["succeeded"] >= criteria["numberOfSucceededThings"])
            ):
                rate = min(rate * exponential["incrementFactor"], maximum)
                job.rates.append(rate)
                since_step = {"notified": 0, "succeeded": self._succeeded(job)}
            next_at = max(next_at + 60.0 / rate, time.monotonic() - 1.0)
        job.done.set()
        self._settle(job)

    def notified(self, job_id: str) -> dict[str, float]:
        """Thing -> when the job reached it (time.monotonic()), so far."""
        with self._lock:
            return dict(self.jobs[job_id].notified_at)

    def statuses(self, job_id: str) -> dict[str, str]:
        """Thing -> status of its execution of the job, for the things it reached so far (one short lock hold:
        a watcher polling this must not starve the devices' requests)."""
        with self._lock:
            return {thing: self.executions[thing][job_id].status for thing in self.jobs[job_id].notified_at}

    def _stopping(self, job: RolloutJob) -> bool:
        return job.status != "IN_PROGRESS" or self._closed

    def _succeeded(self, job: RolloutJob) -> int:
        with self._lock:
            return sum(self.executions[t][job.job_id].status == "SUCCEEDED" for t in job.notified_at)

    def _judge(self, job: RolloutJob) -> None:
        """After an execution finished: abort by the job's criteria, or complete it when every thing is done."""
        finished = [self.executions[t][job.job_id].status for t in job.notified_at if self.executions[t][job.job_id].status in TERMINAL]
        for criterion in (job.configuration.get("abortConfig") or {}).get("criteriaList", []):
            failures = sum(status in FAILURE_TYPES[criterion["failureType"]] for status in finished)
            if len(finished) >= criterion["minNumberOfExecutedThings"] and 100.0 * failures / len(finished) >= criterion["thresholdPercentage"]:
                job.status = "CANCELED"
                job.abort_reason = f"{failures} of {len(finished)} executed things failed ({criterion['failureType']}), at or over {criterion['thresholdPercentage']}%"
                for thing in job.notified_at:
                    if self.executions[thing][job.job_id].status == "QUEUED":
                        self.cancel_job(thing, job.job_id)
                job.wake.set()
                return
        self._settle(job)

    def _settle(self, job: RolloutJob) -> None:
        with self._lock:
            if job.status == "IN_PROGRESS" and job.done.is_set() and all(self.executions[t][job.job_id].status in TERMINAL for t in job.notified_at):
                job.status = "COMPLETED"

    def cancel_job(self, thing: str, job_id: str) -> None:
        with self._lock:
            before = self._next(thing)
            execution = self.executions[thing][job_id]
            execution.status, execution.version = "CANCELED", execution.version + 1
            self._notify_if_changed(thing, before)

    def notify_next(self, thing: str) -> None:
        """Send notify-next again as it is (IoT may deliver a notification more than once)."""
        with self._lock:
            self._send_next(thing)

    def set_desired(self, thing: str, desired: dict) -> None:
        with self._lock:
            self._shadow_update(thing, {"state": {"desired": desired}})

    def execution(self, thing: str, job_id: str) -> Execution | None:
        """A copy of the thing's execution of the job; None if the job never reached it."""
        with self._lock:
            return copy.deepcopy(self.executions.get(thing, {}).get(job_id))

    # -- requests from devices -------------------------------------------------------------------------------

    def _on_message(self, data) -> None:
        super()._on_message(data)
        topic = data.publish_packet.topic
        parts = topic.split("/")
        if len(parts) < 5 or parts[:2] != ["$aws", "things"]:
            return
        thing, service, rest = parts[2], parts[3], parts[4:]
        try:
            request = json.loads(bytes(data.publish_packet.payload) or b"{}")
        except ValueError:
            request = None
        with self._lock:
            if service == "jobs":
                self._jobs_request(thing, rest, topic, request)
            elif service == "shadow" and len(rest) == 1:
                self._shadow_request(thing, rest[0], topic, request)

    def _reply(self, topic: str, payload: dict) -> None:
        self.publish(topic, json.dumps(payload).encode())

    def _reject(self, topic: str, request: dict | None, code, message: str, **extra) -> None:
        payload = {"code": code, "message": message, "timestamp": now(), **extra}
        if isinstance(request, dict) and "clientToken" in request:
            payload["clientToken"] = request["clientToken"]
        self._reply(topic + "/rejected", payload)

    def _accept(self, topic: str, request: dict, payload: dict) -> None:
        if "clientToken" in request:
            payload["clientToken"] = request["clientToken"]
        self._reply(topic + "/accepted", {**payload, "timestamp": now()})

    # -- Jobs ------------------------------------------------------------------------------------------------

    def _next(self, thing: str) -> Execution | None:
        pending = [e for e in self.executions.get(thing, {}).values() if e.status in ("QUEUED", "IN_PROGRESS")]
        pending.sort(key=lambda e: (e.status != "IN_PROGRESS", e.order))
        return pending[0] if pending else None

    def _send_next(self, thing: str) -> None:
        payload: dict[str, Any] = {"timestamp": now()}
        execution = self._next(thing)
        if execution is not None:
            payload["execution"] = execution.data()
        self._reply(f"$aws/things/{thing}/jobs/notify-next", payload)

    def _notify_if_changed(self, thing: str, before: Execution | None) -> None:
        after = self._next(thing)
        if (before.job_id if before else None) != (after.job_id if after else None):
            self._send_next(thing)

    def _jobs_request(self, thing: str, rest: list[str], topic: str, request: Any) -> None:
        if rest == ["start-next"]:
            self._start_next(thing, topic, request)
        elif len(rest) == 2 and rest[1] == "update":
            self._update(thing, rest[0], topic, request)
        elif len(rest) == 2 and rest[1] == "get":
            self._describe(thing, rest[0], topic, request)

    def _start_next(self, thing: str, topic: str, request: Any) -> None:
        if not isinstance(request, dict):
            return self._reject(topic, request, "InvalidRequest", "Request payload is not valid JSON")
        execution = self._next(thing)
        payload: dict[str, Any] = {}
        if execution is not None:
            if execution.status == "QUEUED":
                execution.status, execution.started_at = "IN_PROGRESS", now()
                execution.version += 1
            if "statusDetails" in request:
                execution.status_details = request["statusDetails"]
            execution.last_updated_at = now()
            payload["execution"] = execution.data()
        self._accept(topic, request, payload)

    def _describe(self, thing: str, job_id: str, topic: str, request: Any) -> None:
        execution = self._next(thing) if job_id == "$next" else self.executions.get(thing, {}).get(job_id)
        if execution is None:
            return self._reject(topic, request, "ResourceNotFound", f"Job Execution not found for thing {thing}")
        if execution.status in TERMINAL:
            return self._reject(topic, request, "TerminalStateReached", f"Job execution {job_id} is in terminal state {execution.status}")
        self._accept(topic, request, {"execution": execution.data()})

    def _update(self, thing: str, job_id: str, topic: str, request: Any) -> None:
        execution = self.executions.get(thing, {}).get(job_id)
        if not isinstance(request, dict) or request.get("status") not in DEVICE_MAY_SET | {"QUEUED"}:
            return self._reject(topic, request, "InvalidRequest", "status must be one of IN_PROGRESS, SUCCEEDED, FAILED, REJECTED")
        if execution is None:
            return self._reject(topic, request, "ResourceNotFound", f"Job Execution not found for thing {thing} and job {job_id}")
        if "expectedVersion" in request and request["expectedVersion"] != execution.version:
            return self._reject(topic, request, "VersionMismatch", "The expected version does not match", executionState=execution.state())
        if execution.status in TERMINAL or request["status"] not in DEVICE_MAY_SET:
            return self._reject(topic, request, "InvalidStateTransition", f"Cannot update job execution from {execution.status} to {request['status']}", executionState=execution.state())
        before = self._next(thing)
        execution.status = request["status"]
        if "statusDetails" in request:
            execution.status_details = request["statusDetails"]
        execution.version += 1
        execution.last_updated_at = now()
        if execution.started_at is None:
            execution.started_at = now()
        execution.updates.append(request)
        payload: dict[str, Any] = {}
        if request.get("includeJobExecutionState"):
            payload["executionState"] = execution.state()
        if request.get("includeJobDocument"):
            payload["jobDocument"] = execution.document
        self._accept(topic, request, payload)
        self._notify_if_changed(thing, before)
        if job_id in self.jobs and execution.status in TERMINAL:
            self._judge(self.jobs[job_id])

    # -- Shadow ----------------------------------------------------------------------------------------------

    def _shadow_request(self, thing: str, action: str, topic: str, request: Any) -> None:
        if action == "get":
            shadow = self.shadows.get(thing)
            if shadow is None:
                return self._reject(topic, request, 404, f"No shadow exists with name: '{thing}'")
            state = copy.deepcopy(shadow.state)
            difference = delta(state.get("desired", {}), state.get("reported", {}))
            if difference:
                state["delta"] = difference
            self._accept(topic, request if isinstance(request, dict) else {}, {"state": state, "metadata": shadow.metadata, "version": shadow.version})
        elif action == "update":
            self._shadow_update(thing, request, topic)
        elif action == "delete":
            shadow = self.shadows.pop(thing, None)
            if shadow is None:
                return self._reject(topic, request, 404, f"No shadow exists with name: '{thing}'")
            self._accept(topic, request if isinstance(request, dict) else {}, {"version": shadow.version})

    def _shadow_update(self, thing: str, request: Any, topic: str | None = None) -> None:
        topic = topic or f"$aws/things/{thing}/shadow/update"
        if not isinstance(request, dict) or not isinstance(request.get("state"), dict):
            return self._reject(topic, request, 400, "Missing required node: state")
        shadow = self.shadows.get(thing)
        if "version" in request and (shadow is None or request["version"] != shadow.version):
            return self._reject(topic, request, 409, "Version conflict")
        shadow = shadow or Shadow()
        previous = {"state": copy.deepcopy(shadow.state), "metadata": copy.deepcopy(shadow.metadata), "version": shadow.version}
        at = now()
        for section in ("desired", "reported"):
            if section in request["state"]:
                changes = request["state"][section]
                if changes is None:
                    shadow.state.pop(section, None)
                    shadow.metadata.pop(section, None)
                    continue
                merge(shadow.state.setdefault(section, {}), changes)
                merge(shadow.metadata.setdefault(section, {}), stamps(changes, at))
        shadow.version += 1
        self.shadows[thing] = shadow
        token = {"clientToken": request["clientToken"]} if "clientToken" in request else {}
        metadata = {section: stamps(request["state"][section] or {}, at) for section in ("desired", "reported") if section in request["state"]}
        self._accept(topic, request, {"state": request["state"], "metadata": metadata, "version": shadow.version})
        current = {"state": copy.deepcopy(shadow.state), "metadata": copy.deepcopy(shadow.metadata), "version": shadow.version}
        self._reply(f"$aws/things/{thing}/shadow/update/documents", {"previous": previous if previous["version"] else None, "current": current, "timestamp": at, **token})
        difference = delta(shadow.state.get("desired", {}), shadow.state.get("reported", {}))
        if "desired" in request["state"] and difference:
            self._reply(f"$aws/things/{thing}/shadow/update/delta", {"state": difference, "metadata": stamps(difference, at), "version": shadow.version, "timestamp": at, **token})
