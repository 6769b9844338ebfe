"""`edge-agent provision`: fleet provisioning by claim against the identity stand-in (tests/identity_service.py)
on Mosquitto with mutual TLS. The device side is the real CLI process on the SDK's IotIdentityClientV2; the
stand-in runs the stack's own provisioning template (deploy/cloudformation/edge-agent.yaml) and issues real
certificates from the test CA, so the provisioned device then connects and publishes with its own.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.messages import unbatch
from broker import Mosquitto, Observer, Pki, free_port, needs_mosquitto
from cfn_template import provisioning_template
from conftest import SAMPLE_VIDEO, agent_env, assert_one_line_error
from identity_service import CLAIM, IdentityService, claim_acl

pytestmark = [pytest.mark.broker, needs_mosquitto]
TEMPLATE, BODY = provisioning_template("edge")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki, tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), pki, extra_acl=claim_acl()) as mosquitto:
        yield mosquitto


@pytest.fixture
def identity(broker, pki):
    with IdentityService(broker, pki, {TEMPLATE: BODY}) as service:
        yield service


@pytest.fixture(scope="module")
def claim(pki):
    return pki.ca.issue(CLAIM)


def results_of(messages) -> list[dict]:
    return [result for message in messages if message.topic.endswith("/inference") for result in unbatch(message.payload)]


def provision_command(claim, pki, port: int, out: Path, *extra: str, template: str = TEMPLATE, serial: str = "cam-0001") -> list[str]:
    return [
        sys.executable, "-m", "agent", "provision", "--claim-cert", str(claim.cert), "--claim-key", str(claim.key), "--template", template,
        "--endpoint", "127.0.0.1", "--port", str(port), "--ca", str(pki.ca.path), "--serial", serial, "--out", str(out), "--timeout", "5", *extra,
    ]


def provision(claim, pki, port: int, out: Path, *extra: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(provision_command(claim, pki, port, out, *extra, **options), capture_output=True, text=True, timeout=60, env=agent_env(), cwd=out.parent)


def test_a_device_provisions_itself_and_then_runs_with_its_own_certificate(broker, pki, claim, identity, tmp_path):
    out = tmp_path / "device"
    result = provision(claim, pki, broker.port, out)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["thing"], summary["already_provisioned"]) == ("cam-0001", False)
    assert summary["device_configuration"] == {"topicPrefix": "edge", "captureRoleAlias": "edge-captures"}

    # IoT Core's side: the thing as the template says, the certificate active, the device policy attached.
    thing = identity.things["cam-0001"]
    assert (thing.groups, thing.attributes, thing.policies) == (["edge-fleet"], {"serial": "cam-0001"}, ["edge-device"])
    assert identity.certificates[summary["certificate_id"]].status == "ACTIVE"
    assert thing.certificates == [summary["certificate_id"]]

    # The device's side: its own key (0600) and certificate, the settings, nothing pending.
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "private.pem.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "agent.yaml").stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["agent.yaml", "device.pem.crt", "private.pem.key", "root-ca.pem"]
    settings = yaml.safe_load((out / "agent.yaml").read_text())
    assert settings["thing_name"] == "cam-0001" and settings["mqtt"]["port"] == broker.port

    # And it runs: results reach the broker on its own topic, through its own certificate.
    with Observer(broker, pki) as observer:
        observer.subscribe("edge/cam-0001/inference")
        run = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--config", str(out / "agent.yaml"), "--source", str(SAMPLE_VIDEO), "--max-frames", "20"],
            capture_output=True, text=True, timeout=120, env=agent_env(EDGE_AGENT_PUBLISH_EMPTY="true"), cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        messages = observer.wait_for(lambda seen: len(results_of(seen)) >= 20, timeout_s=30)
    assert len(results_of(messages)) >= 20

    # A second run changes nothing.
    again = provision(claim, pki, broker.port, out)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["already_provisioned"] is True
    assert identity.requests == {"CreateKeysAndCertificate": 1, "RegisterThing": 1}


def test_a_rejected_template_is_one_line_and_keeps_the_certificate_for_the_retry(broker, pki, claim, identity, tmp_path):
    out = tmp_path / "device"
    result = provision(claim, pki, broker.port, out, template="no-such-template")
    assert_one_line_error(result, "RegisterThing rejected", "404 ResourceNotFoundException", "--template 'no-such-template'")
    assert sorted(p.name for p in out.iterdir()) == ["pending.json"]
    assert stat.S_IMODE((out / "pending.json").stat().st_mode) == 0o600

    fixed = provision(claim, pki, broker.port, out)
    assert fixed.returncode == 0, fixed.stderr
    assert identity.requests == {"CreateKeysAndCertificate": 1, "RegisterThing": 2}
    assert len(identity.certificates) == 1 and not (out / "pending.json").exists()


def test_a_serial_the_template_cannot_name_a_thing_with_is_refused_before_any_request(broker, pki, claim, identity, tmp_path):
    result = provision(claim, pki, broker.port, tmp_path / "device", serial="bad/serial")
    assert_one_line_error(result, "thing_name")
    assert identity.requests == {}


def test_broker_down_is_one_line_exit_2_and_a_retry_succeeds(pki, claim, tmp_path):
    port = free_port()
    out = tmp_path / "device"
    result = provision(claim, pki, port, out)
    assert_one_line_error(result, f"cannot reach 127.0.0.1:{port}", "run `edge-agent provision` again")
    assert not (out / "agent.yaml").exists() and not (out / "pending.json").exists()

    with Mosquitto(tmp_path / "late-broker", pki, port=port, extra_acl=claim_acl()) as late, IdentityService(late, pki, {TEMPLATE: BODY}) as identity:
        retry = provision(claim, pki, port, out)
        assert retry.returncode == 0, retry.stderr
        assert identity.requests == {"CreateKeysAndCertificate": 1, "RegisterThing": 1}


def test_a_restart_half_way_resumes_with_the_same_certificate(broker, pki, claim, identity, tmp_path):
    out = tmp_path / "device"
    identity.hold_registrations = True
    process = subprocess.Popen(provision_command(claim, pki, broker.port, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env(), cwd=tmp_path)
    try:
        assert identity.held.wait(30), "the device never asked to register"
        process.send_signal(signal.SIGKILL)  # power cut: certificate made, registration asked, no answer yet
        process.wait(10)
    finally:
        process.kill()
    pending = json.loads((out / "pending.json").read_text())
    assert not (out / "agent.yaml").exists() and not (out / "private.pem.key").exists()

    identity.answer_held()  # IoT Core registered it after all; the device never heard
    resumed = provision(claim, pki, broker.port, out)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["certificate_id"] == pending["certificateId"]
    assert identity.requests == {"CreateKeysAndCertificate": 1, "RegisterThing": 2}
    assert identity.things["cam-0001"].certificates == [pending["certificateId"]]
    assert (out / "private.pem.key").read_text() == pending["privateKey"]
    assert sorted(p.name for p in out.iterdir()) == ["agent.yaml", "device.pem.crt", "private.pem.key", "root-ca.pem"]


def test_provision_needs_an_endpoint(claim, pki, tmp_path):
    command = provision_command(claim, pki, 1, tmp_path / "d")
    del command[command.index("--endpoint") : command.index("--endpoint") + 2]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=agent_env(), cwd=tmp_path)
    assert_one_line_error(result, "--endpoint", "EDGE_AGENT_MQTT__ENDPOINT")
