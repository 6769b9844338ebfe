"""The classic Device Shadow: what the device is (model, last update, agent) and the settings the fleet wants.

Reported: `{model: {name, version, sha256}, update: {job, status, reason}, agent: {version}, threshold,
rate}`. Desired `threshold` (score threshold) and `rate` (most frames processed per second) are applied live
and echoed in reported, which clears the delta. A desired value that is out of range is not applied; the
reported `desired_error` says why, and the delta stays visible to the operator.

SDK callbacks only queue work; one worker thread talks to the Shadow service.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from awscrt import mqtt5, mqtt_request_response
from awsiot import ServiceStreamOptions
from awsiot.iotshadow import (
    GetShadowRequest,
    IotShadowClientV2,
    ShadowDeltaUpdatedSubscriptionRequest,
    ShadowState,
    UpdateShadowRequest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent import __version__
from agent.cloud.service_requests import Closing, RequestFailed, ServiceRequests
from agent.inference.pipeline import Pipeline
from agent.updates.manager import Outcome

log = logging.getLogger(__name__)

WORK = {"sync": "read at start", "delta": "change from desired", "outcome": "report of an update"}  # what the worker does, for warnings


class DesiredSettings(BaseModel):
    """The settings an operator may change through the shadow (others in desired are left alone)."""

    model_config = ConfigDict(extra="ignore")

    threshold: float | None = Field(None, ge=0.0, le=1.0, description="publish predictions scoring at least this")
    rate: float | None = Field(None, gt=0.0, le=120.0, description="most frames processed per second")


class DeviceShadow:
    """Keeps the thing's classic shadow in step with the agent, on its own worker thread."""

    def __init__(self, client: mqtt5.Client, thing_name: str, pipeline: Pipeline, *, timeout_s: int = 30):
        self.thing_name = thing_name
        self.pipeline = pipeline
        self.requests = ServiceRequests("Device Shadow", "iot.shadow", timeout_s)
        self.applied: dict[str, float] = {}  # desired values this shadow has told the pipeline to use
        self.update: dict[str, str | None] = {"job": None, "status": None, "reason": None}
        self.desired_error: str | None = None
        options = mqtt_request_response.ClientOptions(max_request_response_subscriptions=2, max_streaming_subscriptions=1, operation_timeout_in_seconds=timeout_s)
        self._shadow = IotShadowClientV2(client, options)
        self._work: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stream = None
        self._thread = threading.Thread(target=self._loop, name="device-shadow", daemon=True)

    def start(self) -> None:
        """Follow delta events, then read the shadow once: desired changed while we were away applies now."""
        stream_options = ServiceStreamOptions(incoming_event_listener=lambda event: self._work.put(("delta", event.state or {})))
        self._stream = self._shadow.create_shadow_delta_updated_stream(ShadowDeltaUpdatedSubscriptionRequest(thing_name=self.thing_name), stream_options)
        self._stream.open()
        self._thread.start()
        self._work.put(("sync", None))

    def close(self) -> None:
        """Prompt whatever the cloud does: a request waiting for its answer gives up at once."""
        self._work.put(("stop", None))
        self.requests.close()
        if self._thread.is_alive():
            self._thread.join()  # short: its one blocking call, a request's answer, returns once closed
        # The SDK ends a stream, and its request-response client, when their objects are released: do it
        # here, while the MQTT client they ride on is still running.
        self._stream = None
        self._shadow = None

    def on_outcome(self, job_id: str, outcome: Outcome) -> None:
        """JobRunner listener: report the update's result and the model now serving."""
        self._work.put(("outcome", (job_id, outcome)))

    def _loop(self) -> None:
        while True:
            kind, value = self._work.get()
            if kind == "stop" or self.requests.closed:
                return
            try:
                if kind == "sync":
                    self._sync()
                elif kind == "delta":
                    self._apply(value)
                    self._report()
                elif kind == "outcome":
                    job_id, outcome = value
                    self.update = {"job": job_id, "status": outcome.status.value, "reason": outcome.reason.value if outcome.reason else None}
                    self._report()
            except Closing:
                return
            except RequestFailed as error:
                log.warning("device shadow %s not done: %s", WORK[kind], error)

    def _sync(self) -> None:
        try:
            answer = self.requests.answer(self._shadow.get_shadow(GetShadowRequest(thing_name=self.thing_name)), self._topic("get"))
            desired = answer.state.desired or {}
        except RequestFailed as error:
            if error.code != 404:  # 404: no shadow yet; our report creates it
                raise
            desired = {}
        self._apply(desired)
        self._report()

    def _apply(self, desired: dict[str, Any]) -> None:
        try:
            wanted = DesiredSettings.model_validate(desired)
        except ValidationError as exc:
            first = exc.errors()[0]
            self.desired_error = f"{'.'.join(map(str, first['loc']))}: {first['msg']} (got {first.get('input')!r})"
            log.warning("device shadow: desired %s not applied", self.desired_error)
            return
        self.desired_error = None
        if wanted.threshold is not None:
            self.applied["threshold"] = wanted.threshold
            self.pipeline.tune(score_threshold=wanted.threshold)  # from the next frame on
        if wanted.rate is not None:
            self.applied["rate"] = wanted.rate
            self.pipeline.tune(max_fps=wanted.rate)

    def reported(self) -> dict[str, Any]:
        model = self.pipeline.slot.active.ref
        state: dict[str, Any] = {
            "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
            "update": self.update,
            "agent": {"version": __version__},
            "threshold": self.applied.get("threshold", self.pipeline.tuning.score_threshold),
            "desired_error": self.desired_error,  # None deletes it from the shadow
        }
        if "rate" in self.applied:
            state["rate"] = self.applied["rate"]
        return state

    def _report(self) -> None:
        request = UpdateShadowRequest(thing_name=self.thing_name, state=ShadowState(reported=self.reported()))
        self.requests.answer(self._shadow.update_shadow(request), self._topic("update"))

    def _topic(self, action: str) -> str:
        return f"$aws/things/{self.thing_name}/shadow/{action}"
