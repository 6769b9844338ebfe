"""IoT Jobs on the real wire: the agent's MQTT5 link to Mosquitto (mutual TLS, policy ACL), IotJobsClientV2,
and a test service answering the Jobs topics as IoT Core does. Artifacts come from the local HTTPS server.
"""

from __future__ import annotations

import gc
import logging
import time

import pytest
from broker import STOPPED_CLIENTS, mosquitto, pki  # noqa: F401 (fixtures)
from iot_service import IotService
from update_helpers import (  # noqa: F401 (fixtures)
    NEW,
    SERVING,
    artifacts,
    document,
    keys,
    later,
    make_bundle,
    serving,
)

from agent.cloud.jobs import JobRunner
from agent.errors import Reason
from agent.settings import MqttSettings
from agent.transport.mqtt import MqttLink
from agent.updates.manager import Stage

THING = "jobs-thing"


@pytest.fixture
def service(mosquitto, pki):
    with IotService(mosquitto, pki) as running:
        yield running


@pytest.fixture
def link(mosquitto, pki):
    device = pki.client(THING)
    settings = MqttSettings(endpoint="127.0.0.1", port=mosquitto.port, cert=device.cert, key=device.key, ca=pki.ca.path, flow_control="none")
    connected = MqttLink(settings, client_id=THING)
    connected.connect(timeout_s=10)
    yield connected
    STOPPED_CLIENTS.append(connected.client)
    connected.close()


@pytest.fixture
def devices(serving, link):
    """Makes a serving pipeline (Serving's settings) with its update manager, whose `start_jobs()` starts a
    JobRunner on the agent's MQTT link."""
    runners = []

    def make(**settings):
        s = serving(**settings)

        def start(timeout_s: int = 10) -> JobRunner:
            runners.append(JobRunner(link.client, THING, s.manager, timeout_s=timeout_s))
            runners[-1].start()
            return runners[-1]

        s.start_jobs = start
        return s

    yield make
    for runner in runners:
        runner.close()
    runners.clear()
    gc.collect()  # release the SDK's native clients before the link below them stops


@pytest.fixture
def device(devices):
    """A serving pipeline on the sample video, as `devices` makes it by default."""
    return devices()


def wait_terminal(service: IotService, job_id: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        execution = service.execution(THING, job_id)
        if execution.status not in ("QUEUED", "IN_PROGRESS"):
            return execution
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {execution.status} after {timeout_s} s: {execution.status_details}")


def finished_lines(caplog, timeout_s: float = 10.0) -> list[str]:
    """The INFO lines saying a job finished, once there is one (logged after IoT Jobs accepted the final status)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [r.message for r in caplog.records if r.levelname == "INFO" and " finished with status " in r.message]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_a_queued_model_update_job_runs_reports_progress_and_succeeds(device, service, tmp_path, keys, artifacts, caplog):
    caplog.set_level(logging.INFO)
    data = make_bundle(tmp_path, keys / "trusted.key")
    runner = device.start_jobs()
    service.queue_job(THING, "update-1", document(artifacts.publish("/jobs/good.zip", data), data))  # arrives by notify-next

    execution = wait_terminal(service, "update-1")
    assert execution.status == "SUCCEEDED", execution.status_details
    assert "reason" not in execution.status_details and NEW in execution.status_details["message"]
    assert device.slot.active.ref.version == NEW
    progress = [u["statusDetails"] for u in execution.updates if u["status"] == "IN_PROGRESS"]
    stages = [p["stage"] for p in progress]
    # Sent newest-first by a sender thread: a subsequence of the update's own steps, never out of order.
    steps = iter([Stage.DOWNLOADING, Stage.VERIFYING, Stage.VALIDATING, Stage.ACTIVATING, Stage.WATCHING, Stage.ACTIVATING])
    assert all(any(stage == step for step in steps) for stage in dict.fromkeys(stages)), stages
    assert stages[0] == Stage.DOWNLOADING and Stage.WATCHING in stages  # the window lasts long enough to be seen
    assert all(0 <= int(p["progress"]) <= 100 and p["run"] == runner.run_id for p in progress)
    assert all(isinstance(v, str) for p in progress for v in p.values())  # statusDetails are strings only
    device.assert_no_frame_lost()
    [line] = finished_lines(caplog)
    assert line.startswith("job update-1 finished with status SUCCEEDED and reason none: ") and NEW in line


@pytest.mark.parametrize(
    "changes, reason, status",
    [
        ({"sha256": "0" * 64}, Reason.SHA256_MISMATCH, "FAILED"),
        ({"operation": "reboot"}, Reason.UNKNOWN_OPERATION, "FAILED"),
        ({"size": "big"}, Reason.MALFORMED_DOCUMENT, "FAILED"),
        ({"version": "0.0.1"}, Reason.DOWNGRADE_REFUSED, "REJECTED"),
    ],
)
def test_a_bad_job_ends_with_its_reason_code_and_the_old_model_serving(changes, reason, status, device, service, tmp_path, keys, artifacts, caplog):
    caplog.set_level(logging.INFO)
    data = make_bundle(tmp_path, keys / "trusted.key")
    service.queue_job(THING, "bad-1", {**document(artifacts.publish(f"/jobs/bad-{reason}.zip", data), data), **changes})
    device.start_jobs()  # queued before the agent started: found at start-up
    execution = wait_terminal(service, "bad-1")
    assert (execution.status, execution.status_details["reason"]) == (status, reason.value)
    assert execution.status_details["message"]
    assert device.slot.active.ref.version == SERVING
    device.assert_no_frame_lost()
    [line] = finished_lines(caplog)
    assert line.startswith(f"job bad-1 finished with status {status} and reason {reason.value}: ")


def test_jobs_run_one_after_another_and_repeated_notifications_do_not_rerun_them(device, service, tmp_path, keys, artifacts):
    first, second = later(1), later(2)
    one = make_bundle(tmp_path, keys / "trusted.key", version=first)
    two = make_bundle(tmp_path, keys / "trusted.key", version=second)
    service.queue_job(THING, "seq-1", document(artifacts.publish("/jobs/seq1.zip", one), one, version=first))
    service.queue_job(THING, "seq-2", document(artifacts.publish("/jobs/seq2.zip", two), two, version=second))
    runner = device.start_jobs()
    assert wait_terminal(service, "seq-1").status == "SUCCEEDED"
    assert wait_terminal(service, "seq-2").status == "SUCCEEDED"
    assert device.slot.active.ref.version == second

    updates = len(service.execution(THING, "seq-2").updates)
    for _ in range(3):
        service.notify_next(THING)  # nothing pending: the agent asks, finds nothing, does nothing
    service.publish(f"$aws/things/{THING}/jobs/notify-next", b'{"timestamp": 1, "execution": {"jobId": "seq-2", "status": "QUEUED"}}').result(5)
    time.sleep(0.5)
    assert len(service.execution(THING, "seq-2").updates) == updates
    assert [path for path, _ in artifacts.requests].count("/jobs/seq2.zip") == 1
    assert list(runner.finished) == ["seq-1", "seq-2"]


def test_an_execution_left_in_progress_by_an_earlier_run_is_failed_cleanly(device, service, tmp_path, keys, artifacts):
    data = make_bundle(tmp_path, keys / "trusted.key")
    execution = service.queue_job(THING, "left-over", document(artifacts.publish("/jobs/left.zip", data), data))
    execution.status, execution.status_details = "IN_PROGRESS", {"stage": "watching", "progress": "40", "run": "earlier-run"}
    device.start_jobs()
    execution = wait_terminal(service, "left-over")
    assert (execution.status, execution.status_details["reason"]) == ("FAILED", Reason.INTERRUPTED.value)
    assert "restarted while watching" in execution.status_details["message"]
    assert "/jobs/left.zip" not in [path for path, _ in artifacts.requests]  # not retried blindly
    assert device.slot.active.ref.version == SERVING


def test_an_execution_left_in_progress_whose_model_is_serving_is_finished(device, service, tmp_path, keys, artifacts):
    execution = service.queue_job(THING, "done-before", {**document("https://localhost:1/x.zip", b"x"), "version": SERVING})
    execution.status, execution.status_details = "IN_PROGRESS", {"stage": "activating", "run": "earlier-run"}
    device.start_jobs()
    assert wait_terminal(service, "done-before").status == "SUCCEEDED"


def test_a_job_canceled_while_it_runs_is_left_canceled(device, service, tmp_path, keys, artifacts):
    data = make_bundle(tmp_path, keys / "trusted.key")
    runner = device.start_jobs()
    service.queue_job(THING, "to-cancel", document(artifacts.publish("/jobs/cancel.zip", data), data))
    deadline = time.monotonic() + 20
    while service.execution(THING, "to-cancel").status == "QUEUED" and time.monotonic() < deadline:
        time.sleep(0.005)
    service.cancel_job(THING, "to-cancel")
    while "to-cancel" not in runner.finished and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "to-cancel" in runner.finished  # the agent finished its work and reported; IoT refused (InvalidStateTransition)
    assert service.execution(THING, "to-cancel").status == "CANCELED"
    assert runner._thread.is_alive()  # and it is still there for the next job
    device.assert_no_frame_lost()


def test_a_broker_that_does_not_answer_jobs_is_named_in_the_warning_and_does_not_hold_up_close(device, caplog):
    """No Jobs service on this broker (no stand-in): the warning says which request on which topic got no
    answer and which setting turns Jobs off; close() ends the waiting thread, it does not sit out the timeout."""
    runner = device.start_jobs(timeout_s=1)
    deadline = time.monotonic() + 20
    while not any(r.levelname == "WARNING" for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    warning = next(r.message for r in caplog.records if r.levelname == "WARNING")
    assert warning.startswith(f"IoT Jobs: no answer to the request on $aws/things/{THING}/jobs/start-next within 1 s")
    assert "iot.jobs: false" in warning and not warning.endswith("()")
    slow = device.start_jobs(timeout_s=300)  # asking now, and would wait five minutes for the answer
    time.sleep(0.5)
    slow.close()
    assert not slow._thread.is_alive()
    runner.close()
