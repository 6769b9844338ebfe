"""The classic Device Shadow on the real wire (Mosquitto, mutual TLS, IotShadowClientV2, the IoT stand-in),
and the whole standalone agent process taking a model update from an IoT Job and reporting it in its shadow.
"""

from __future__ import annotations

import gc
import json
import time

import pytest
from agent_process import running_agent, wait_for
from awscrt import mqtt_request_response
from awsiot import V2ServiceException
from awsiot.iotshadow import IotShadowClientV2, ShadowState, UpdateShadowRequest
from broker import STOPPED_CLIENTS, mosquitto, pki  # noqa: F401 (fixtures)
from conftest import SAMPLE_VIDEO
from iot_service import IotService, delta
from update_helpers import NEW, SERVING, artifacts, document, keys, make_bundle, serving  # noqa: F401 (fixtures)

from agent import __version__
from agent.bundles.document import Status
from agent.cloud.service_requests import rejection_code
from agent.cloud.shadow import DeviceShadow
from agent.errors import Reason
from agent.settings import DEV_SIGNING_KEY, MqttSettings
from agent.transport.mqtt import MqttLink
from agent.updates.manager import Outcome

THING = "shadow-thing"


@pytest.fixture
def service(mosquitto, pki):
    with IotService(mosquitto, pki) as running:
        yield running


def connect(mosquitto, pki, thing: str) -> MqttLink:
    device = pki.client(thing)
    settings = MqttSettings(endpoint="127.0.0.1", port=mosquitto.port, cert=device.cert, key=device.key, ca=pki.ca.path, flow_control="none")
    link = MqttLink(settings, client_id=thing)
    link.connect(timeout_s=10)
    return link


@pytest.fixture
def device(serving, mosquitto, pki):
    """A serving pipeline and a DeviceShadow on the agent's MQTT link (started by the test)."""
    s = serving()
    link = connect(mosquitto, pki, THING)
    s.shadow = DeviceShadow(link.client, THING, s.pipeline, timeout_s=10)
    yield s
    s.shadow.close()
    s.shadow = None
    gc.collect()  # release the SDK's native clients before the link below them stops
    STOPPED_CLIENTS.append(link.client)
    link.close()


def reported(service: IotService, thing: str = THING) -> dict:
    shadow = service.shadows.get(thing)
    return shadow.state.get("reported", {}) if shadow else {}


def test_a_new_device_creates_its_shadow_with_what_it_serves(device, service):
    device.shadow.start()
    state = wait_for(lambda: reported(service), "the first report")
    model = device.slot.active.ref
    assert state["model"] == {"name": model.name, "version": SERVING, "sha256": model.sha256}
    assert state["agent"] == {"version": __version__}
    assert state["threshold"] == 0.5
    assert "desired_error" not in state and "rate" not in state


def test_desired_settings_set_while_away_apply_at_start_and_are_echoed(device, service):
    service.set_desired(THING, {"threshold": 0.8, "rate": 12})
    device.shadow.start()
    wait_for(lambda: reported(service).get("threshold") == 0.8, "threshold echoed")
    wait_for(lambda: (device.pipeline.tuning.score_threshold, device.pipeline.tuning.max_fps) == (0.8, 12), "applied between frames")
    assert reported(service)["rate"] == 12
    assert delta(service.shadows[THING].state["desired"], reported(service)) == {}  # no delta left


def test_desired_settings_changed_live_are_applied_between_frames_and_echoed(device, service):
    device.shadow.start()
    wait_for(lambda: reported(service), "the first report")
    service.set_desired(THING, {"threshold": 0.3})
    wait_for(lambda: reported(service).get("threshold") == 0.3, "threshold echoed")
    wait_for(lambda: device.pipeline.tuning.score_threshold == 0.3, "applied between frames")
    device.wait_frames(5)
    device.assert_no_frame_lost()


def test_an_out_of_range_desired_value_is_not_applied_and_says_why(device, service):
    device.shadow.start()
    wait_for(lambda: reported(service), "the first report")
    service.set_desired(THING, {"threshold": 5})
    error = wait_for(lambda: reported(service).get("desired_error"), "desired_error reported")
    assert error.startswith("threshold:") and "5" in error
    assert device.pipeline.tuning.score_threshold == 0.5
    assert delta(service.shadows[THING].state["desired"], reported(service)) == {"threshold": 5}  # the operator still sees it
    service.set_desired(THING, {"threshold": 0.6})
    wait_for(lambda: reported(service).get("threshold") == 0.6, "the corrected value echoed")
    assert "desired_error" not in reported(service)


def test_an_update_outcome_is_reported_with_the_model_serving(device, service):
    device.shadow.start()
    wait_for(lambda: reported(service), "the first report")
    device.shadow.on_outcome("job-7", Outcome(status=Status.FAILED, reason=Reason.SHA256_MISMATCH, message="sha256 differs"))
    update = wait_for(lambda: reported(service).get("update", {}).get("job") == "job-7" and reported(service)["update"], "the outcome reported")
    assert update == {"job": "job-7", "status": "FAILED", "reason": "SHA256_MISMATCH"}
    assert reported(service)["model"]["version"] == SERVING


def test_a_broker_that_does_not_answer_the_shadow_is_named_in_the_warning_and_does_not_hold_up_close(serving, mosquitto, pki, caplog):
    """No Shadow service on this broker (no stand-in): the warning names the request's topic and the setting
    that turns the shadow off, instead of ending in an empty "()"; close() does not sit out the timeout."""
    s = serving()
    link = connect(mosquitto, pki, THING)
    shadows = [DeviceShadow(link.client, THING, s.pipeline, timeout_s=timeout) for timeout in (1, 300)]
    try:
        shadows[0].start()
        warning = wait_for(lambda: next((r.message for r in caplog.records if r.levelname == "WARNING"), None), "a warning", timeout=20)
        assert warning.startswith(f"device shadow read at start not done: Device Shadow: no answer to the request on $aws/things/{THING}/shadow/get within 1 s")
        assert "iot.shadow: false" in warning and not warning.endswith("()")
        shadows[1].start()  # asking now, and would wait five minutes for the answer
        time.sleep(0.5)
        shadows[1].close()
        assert not shadows[1]._thread.is_alive()
    finally:
        for shadow in shadows:
            shadow.close()
        shadows.clear()
        gc.collect()
        STOPPED_CLIENTS.append(link.client)
        link.close()


def test_the_stand_in_refuses_a_stale_shadow_version_with_409(service, mosquitto, pki):
    """The stand-in answers as IoT Core does: an update naming an old version is a 409 conflict."""
    link = connect(mosquitto, pki, THING)
    try:
        client = IotShadowClientV2(link.client, mqtt_request_response.ClientOptions(max_request_response_subscriptions=2, max_streaming_subscriptions=1, operation_timeout_in_seconds=10))
        first = client.update_shadow(UpdateShadowRequest(thing_name=THING, state=ShadowState(reported={"a": 1}))).result(10)
        client.update_shadow(UpdateShadowRequest(thing_name=THING, state=ShadowState(reported={"a": 2}), version=first.version)).result(10)
        with pytest.raises(V2ServiceException) as refused:
            client.update_shadow(UpdateShadowRequest(thing_name=THING, state=ShadowState(reported={"a": 3}), version=first.version)).result(10)
        assert rejection_code(refused.value) == 409
        del client
        gc.collect()
    finally:
        STOPPED_CLIENTS.append(link.client)
        link.close()


def test_the_standalone_agent_takes_a_model_update_job_and_reports_it_in_its_shadow(mosquitto, pki, service, tmp_path, keys, artifacts):
    """`edge-agent run --transport mqtt` end to end: Jobs and Shadow on its own connection, the store on disk."""
    thing = "agent-under-test"
    device = pki.client(thing)
    env = {
        "EDGE_AGENT_UPDATES__STORE": str(tmp_path / "store"),
        "EDGE_AGENT_UPDATES__HEALTH_FRAMES": "10",
        "EDGE_AGENT_UPDATES__DOWNLOAD__CA_FILE": str(artifacts.ca_file),
        "EDGE_AGENT_OUTBOX__PATH": str(tmp_path / "outbox.sqlite3"),
    }
    args = [
        "--transport", "mqtt", "--thing-name", thing, "--endpoint", "127.0.0.1", "--port", mosquitto.port,
        "--cert", device.cert, "--key", device.key, "--ca", pki.ca.path, "--source", SAMPLE_VIDEO, "--loop", "--pace-fps", "30",
        "--trusted-key", DEV_SIGNING_KEY, "--trusted-key", keys / "trusted.pub",
    ]
    data = make_bundle(tmp_path, keys / "trusted.key")
    service.subscribe(f"edge/{thing}/inference")
    service.subscribe(f"edge/{thing}/status")
    with running_agent(*args, env=env) as agent:
        wait_for(lambda: reported(service, thing).get("model", {}).get("version") == SERVING, "the agent's first shadow report", timeout=30)
        service.queue_job(thing, "fleet-update-1", document(artifacts.publish("/e2e/bundle.zip", data), data))
        wait_for(lambda: service.execution(thing, "fleet-update-1").status not in ("QUEUED", "IN_PROGRESS"), "the job to end", timeout=60)
        execution = service.execution(thing, "fleet-update-1")
        assert execution.status == "SUCCEEDED", (execution.status_details, agent.stderr()[-2000:])
        state = wait_for(lambda: reported(service, thing).get("model", {}).get("version") == NEW and reported(service, thing), "the new model reported")
        assert state["update"] == {"job": "fleet-update-1", "status": "SUCCEEDED"}
        results = [m for m in service.messages if m.topic == f"edge/{thing}/inference"]
        assert results  # it kept publishing results throughout
        status = wait_for(lambda: [m for m in service.messages if m.topic == f"edge/{thing}/status" and json.loads(m.payload)["model"]["version"] == NEW], "the status naming the new model")
        assert json.loads(status[-1].payload)["state"] == "online"  # (published retained; live delivery clears the flag)
    assert (tmp_path / "store" / "mnist-int8" / NEW / "model.tflite").is_file()
