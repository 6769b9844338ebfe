"""AWS IoT Jobs, device side: the fleet's model-update jobs run through the update manager.

Flow, on the SDK's `IotJobsClientV2` over the agent's own MQTT5 connection: a notify-next event (or start-up)
wakes the jobs thread, which claims the next execution with start-next, runs its document through the
`UpdateManager` reporting each stage in `statusDetails`, and ends it SUCCEEDED, FAILED or REJECTED with the
outcome's reason code and message. SDK callbacks only wake the thread: requests made from inside a
callback can dead-lock the client.

An execution found IN_PROGRESS that an earlier run of the agent started (its statusDetails carry another
run id) is not repeated blindly, since that run may have died of the very model it was installing: it
ends SUCCEEDED if that model is serving now, FAILED (INTERRUPTED) otherwise.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from awscrt import mqtt5, mqtt_request_response
from awsiot import ServiceStreamOptions
from awsiot.iotjobs import (
    IotJobsClientV2,
    JobExecutionData,
    NextJobExecutionChangedSubscriptionRequest,
    StartNextPendingJobExecutionRequest,
    UpdateJobExecutionRequest,
)

from agent.bundles.document import Status, UpdateFailed, parse_update
from agent.cloud.service_requests import Closing, RequestFailed, ServiceRequests
from agent.errors import Reason
from agent.updates.manager import Outcome, Stage, UpdateManager

log = logging.getLogger(__name__)

PROGRESS_STEP = 25  # percent: statusDetails are updated at each stage and every quarter of it, not per chunk
RETRY_S = 5.0  # after the Jobs service did not answer, try again this much later
CLOSE_WAIT_S = 1.0  # how long close() waits for a job's own work (a download, a health window) to notice

OutcomeListener = Callable[[str, Outcome], None]  # job id, outcome


class JobRunner:
    """Runs this thing's jobs one at a time on its own thread."""

    def __init__(self, client: mqtt5.Client, thing_name: str, manager: UpdateManager, *, timeout_s: int = 30):
        self.thing_name = thing_name
        self.manager = manager
        self.requests = ServiceRequests("IoT Jobs", "iot.jobs", timeout_s)
        self.run_id = uuid.uuid4().hex[:12]  # tells our own IN_PROGRESS executions from an earlier run's
        self.listeners: list[OutcomeListener] = []
        self.finished: dict[str, Outcome] = {}  # job id -> outcome reported: duplicates are answered, not re-run
        options = mqtt_request_response.ClientOptions(max_request_response_subscriptions=3, max_streaming_subscriptions=1, operation_timeout_in_seconds=timeout_s)
        self._jobs = IotJobsClientV2(client, options)
        self._progress_sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iot-jobs-progress")
        self._progress_lock = threading.Lock()
        self._latest_progress: tuple[str, dict[str, str]] | None = None
        self._progress_sent: Future = Future()
        self._progress_sent.set_result(None)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._stream = None
        self._thread = threading.Thread(target=self._loop, name="iot-jobs", daemon=True)

    def start(self) -> None:
        """Listen for notify-next and look for pending work once now (a job queued while we were away)."""
        stream_options = ServiceStreamOptions(incoming_event_listener=lambda event: self._wake.set(), subscription_status_listener=self._on_subscription)
        self._stream = self._jobs.create_next_job_execution_changed_stream(NextJobExecutionChangedSubscriptionRequest(thing_name=self.thing_name), stream_options)
        self._stream.open()
        self._thread.start()
        self._wake.set()

    def close(self) -> None:
        """Prompt whatever the cloud does: requests waiting for an answer give up at once. A job in the middle
        of its own work gets CLOSE_WAIT_S; if it is still busy then, its execution stays IN_PROGRESS and the
        next start fails it as interrupted (or finishes it, if its model is serving)."""
        self._stop.set()
        self._wake.set()
        self.requests.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(CLOSE_WAIT_S)
        self._progress_sender.shutdown(wait=False)
        # The SDK ends a stream, and its request-response client, when their objects are released: do it
        # here, while the MQTT client they ride on is still running.
        self._stream = None
        self._jobs = None

    def _on_subscription(self, event) -> None:
        if event.type == mqtt_request_response.SubscriptionStatusEventType.SUBSCRIPTION_ESTABLISHED:
            self._wake.set()  # (re)subscribed: anything queued meanwhile is ours to pick up

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            try:
                while not self._stop.is_set() and self.run_next():
                    pass
            except Closing:
                return
            except RequestFailed as error:
                log.warning("%s; trying again in %.0f s", error, RETRY_S)
            except Exception:  # noqa: BLE001 -- a fault of ours must not end the thread that takes every later job
                log.exception("IoT Jobs: unexpected failure; trying again in %.0f s", RETRY_S)
            else:
                continue
            self._stop.wait(RETRY_S)
            self._wake.set()

    def run_next(self) -> bool:
        """Claim and run the next pending execution; False when there is none."""
        request = StartNextPendingJobExecutionRequest(thing_name=self.thing_name)
        topic = f"$aws/things/{self.thing_name}/jobs/start-next"
        execution = self.requests.answer(self._client().start_next_pending_job_execution(request), topic).execution
        if execution is None:
            return False
        job_id = execution.job_id
        if job_id in self.finished:  # our final update was lost or a notification repeated: say it again
            self._finish(job_id, self.finished[job_id])
            return True
        details = execution.status_details or {}
        if details.get("run") not in (None, self.run_id):
            outcome = self._resumed(execution)
        else:
            outcome = self.manager.apply(execution.job_document, self._progress(job_id))
        self._finish(job_id, outcome)
        return True

    def _resumed(self, execution: JobExecutionData) -> Outcome:
        """An execution an earlier run of the agent left IN_PROGRESS."""
        try:
            update = parse_update(execution.job_document)
        except UpdateFailed as failed:
            return Outcome(status=failed.status, reason=failed.reason, message=str(failed))
        serving = self.manager.slot.active.ref
        if (serving.name, serving.version) == (update.name, update.version):
            return Outcome(status=Status.SUCCEEDED, message=f"{update.name} {update.version} is serving (finished before the agent restarted)", name=update.name, version=update.version)
        stage = (execution.status_details or {}).get("stage", "starting")
        return Outcome(
            status=Status.FAILED,
            reason=Reason.INTERRUPTED,
            message=f"the agent restarted while {stage} {update.name} {update.version}; {serving.name} {serving.version} is serving; run the job again to retry",
            name=update.name,
            version=update.version,
        )

    def _progress(self, job_id: str) -> Callable[[Stage, int], None]:
        """Progress goes out from a sender thread, newest first: the update never waits on a round trip."""
        last: dict[str, int] = {}

        def report(stage: Stage, percent: int, details: dict[str, str] | None = None) -> None:
            step = percent // PROGRESS_STEP
            if last.get(stage) == step or self._stop.is_set():
                return
            last[stage] = step
            with self._progress_lock:  # details: a shadow evaluation's figures so far
                self._latest_progress = (job_id, {"stage": stage.value, "progress": str(percent), **(details or {}), "run": self.run_id})
                if self._progress_sent.done():
                    self._progress_sent = self._progress_sender.submit(self._send_progress)

        return report

    def _send_progress(self) -> None:
        while True:
            with self._progress_lock:
                latest, self._latest_progress = self._latest_progress, None
            if latest is None:
                return
            try:
                self._update(latest[0], "IN_PROGRESS", latest[1])
            except Closing:
                return
            except RequestFailed as error:  # progress is a courtesy; the outcome is not
                log.warning("job %s: progress not reported: %s", latest[0], error)

    def _finish(self, job_id: str, outcome: Outcome) -> None:
        self.finished[job_id] = outcome  # first: if the update below is lost, the retry resends it, not the job
        with self._progress_lock:
            self._latest_progress = None  # stale now; and the final status must be the last word
            sending = self._progress_sent
        sending.result()  # the final status must not overtake progress (whose requests end when closing, too)
        try:
            self._update(job_id, outcome.status.value, {**outcome.status_details(), "run": self.run_id})
        except RequestFailed as error:
            if error.code not in ("TerminalStateReached", "InvalidStateTransition", "ResourceNotFound"):
                raise
            log.warning("job %s: IoT Jobs refused the final status (%s); it was canceled or finished elsewhere", job_id, error.code)
        reason = outcome.reason.value if outcome.reason else "none"
        log.info(
            "job %s finished with status %s and reason %s: %s", job_id, outcome.status.value, reason, outcome.message,
            extra={"job_id": job_id, "status": outcome.status.value, "reason": reason},
        )
        for listener in self.listeners:
            listener(job_id, outcome)

    def _update(self, job_id: str, status: str, details: dict[str, str]) -> None:
        request = UpdateJobExecutionRequest(thing_name=self.thing_name, job_id=job_id, status=status, status_details=details)
        self.requests.answer(self._client().update_job_execution(request), f"$aws/things/{self.thing_name}/jobs/{job_id}/update")

    def _client(self) -> IotJobsClientV2:
        """The SDK's Jobs client; Closing once close() has released it (a job can outlive close by its own work)."""
        jobs = self._jobs
        if jobs is None or self.requests.closed:
            raise Closing
        return jobs
