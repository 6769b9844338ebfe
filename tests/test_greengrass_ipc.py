"""The agent as a Greengrass component, run the way the nucleus runs it, against a nucleus speaking IPC.

Each test starts the recipe's own Run script (recipe variables substituted) with only the nucleus's
environment variables, in a fresh {work:path}. The Install step is not run: {work:path}/venv is a link to
this project's .venv, which is what Install would build (the same wheel and pinned dependencies), so
the tests need no network and take seconds. The model component's {artifacts:decompressedPath} is a
temporary folder holding the shipped bundle zipped as build.py zips it, and unzipped, as the nucleus does.
"""

from __future__ import annotations

import base64
import json
import re
import select
import shutil
import signal
import subprocess
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
from conftest import REPO, SAMPLE_VIDEO, SHIPPED_BUNDLE
from ipc_server import LATE_DEFERRAL, SPOOL_FULL, IpcServer, leaves, merge_configuration

from agent.bundles.signing import generate_key
from agent.fleet.packing import sign_bundle, write_manifest, write_zip
from agent.messages import unbatch
from agent.transport.base import PublishRejected
from agent.transport.greengrass import IpcLink

RECIPE = json.loads((REPO / "deploy" / "greengrass" / "recipe.json").read_text())
MODEL_COMPONENT = "com.example.EdgeAgent.MnistModel"
THING = "cam-1"
INFERENCE, STATUS, COMMANDS = f"edge/{THING}/inference", f"edge/{THING}/status", f"edge/{THING}/commands"
RESULT_SCHEMA = json.loads((REPO / "agent" / "schemas" / "inference-result.schema.json").read_text())
BATCH_SCHEMA = json.loads((REPO / "agent" / "schemas" / "batch.schema.json").read_text())


def interpolate(script: str, variables: dict[str, object]) -> str:
    """Recipe variables replaced like the nucleus does; a variable the test does not know is an error."""
    for name, value in variables.items():
        script = script.replace("{" + name + "}", str(value))
    left = re.findall(r"\{[^{}\s]+\}", script)
    assert not left, f"recipe variables the test nucleus does not know: {left}"
    return script


def model_component(root: Path, bundle: Path) -> Path:
    """A model component version as the nucleus lays it out: its zip unpacked under decompressedPath."""
    decompressed = root / "artifacts-unarchived"
    root.mkdir(parents=True)
    archive = root / "mnist-bundle.zip"
    write_zip(bundle, archive)  # what build.py ships as the model component's artifact
    with zipfile.ZipFile(archive) as unzip:
        unzip.extractall(decompressed / "mnist-bundle")
    return decompressed


@dataclass
class Component:
    nucleus: IpcServer
    process: subprocess.Popen
    work: Path
    stderr_read: str = ""

    def next_stderr_line(self, timeout: float = 60) -> str:
        """The next line the component writes on stderr, waiting for it at most `timeout`."""
        ready, _, _ = select.select([self.process.stderr], [], [], timeout)
        assert ready, f"the component wrote nothing on stderr within {timeout} s"
        line = self.process.stderr.readline()
        self.stderr_read += line
        return line

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=timeout)
        return self.process.returncode, self.stderr_read + stderr

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as the nucleus stops a component."""
        self.process.send_signal(signal.SIGTERM)
        return self.finish()

    def results(self, topic: str = INFERENCE) -> list[dict]:
        return [result for message in self.nucleus.published_to(topic) for result in unbatch(message.payload)]


@pytest.fixture
def greengrass(tmp_path):
    """start(configuration) -> a running component (its nucleus: start.nucleus); everything is stopped at the end of the test."""
    started: list[Component] = []
    nucleus = IpcServer(tmp_path / "ipc.socket", thing_name=THING).start()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy2(REPO / "models" / "keys" / "dev-signing-2026-12b.pub", artifacts / "model-signing.pub")
    model = model_component(tmp_path / "model-0", SHIPPED_BUNDLE)

    def start(configuration: dict, auth_token: str | None = None, env: dict[str, str] | None = None) -> Component:
        nucleus.configuration = merge_configuration(RECIPE["ComponentConfiguration"]["DefaultConfiguration"], configuration)
        work = tmp_path / f"work-{len(started)}"
        work.mkdir()
        (work / "venv").symlink_to(REPO / ".venv", target_is_directory=True)
        script = interpolate(
            RECIPE["Manifests"][0]["Lifecycle"]["Run"]["Script"],
            {"artifacts:path": artifacts, "work:path": work, "iot:thingName": THING, f"{MODEL_COMPONENT}:artifacts:decompressedPath": model},
        )
        process = subprocess.Popen(["sh", "-c", script], cwd=work, env={**nucleus.component_env(auth_token), **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started.append(Component(nucleus, process, work))
        return started[-1]

    start.nucleus = nucleus
    yield start
    for component in started:
        if component.process.poll() is None:
            component.process.kill()
            component.process.communicate()
    nucleus.stop()


def sample(**source) -> dict:
    return {"source": {"spec": str(SAMPLE_VIDEO), **source}}


def test_results_reach_iot_core_through_publish_to_iot_core(greengrass):
    component = greengrass({**sample(), "max_frames": 40})
    code, stderr = component.finish()
    assert code == 0, stderr
    nucleus = component.nucleus
    assert nucleus.states[0] == "RUNNING"
    published = nucleus.published_to(INFERENCE)
    assert published, "no results were published"
    assert {message.qos for message in published} == {"1"}
    for message in published:
        jsonschema.validate(message.json(), BATCH_SCHEMA if message.json()["kind"] == "batch" else RESULT_SCHEMA)
    results = component.results()
    for result in results:
        jsonschema.validate(result, RESULT_SCHEMA)
        assert result["thing_name"] == THING
    assert [r["sequence"] for r in results] == sorted(r["sequence"] for r in results), "results out of order"
    statuses = [message for message in nucleus.published_to(STATUS)]
    assert [s.json()["state"] for s in statuses] == ["online", "offline"] and all(s.retain for s in statuses)
    assert COMMANDS in nucleus.subscriptions
    assert not nucleus.denied, "the recipe's accessControl must allow every topic the agent uses by default"


def test_configuration_change_applies_without_restart(greengrass):
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: len(nucleus.published_to(INFERENCE)) >= 3)
    policies = nucleus.configuration["accessControl"]["aws.greengrass.ipc.mqttproxy"]
    # The deployment that moves the topics allows the new ones too; the old stay allowed for what is in flight.
    moved = {name: {**policy, "resources": policy["resources"] + [r.replace("edge/", "plant7/") for r in policy["resources"]]} for name, policy in policies.items()}
    nucleus.update_configuration({"topics": {"prefix": "plant7"}, "model": {"score_threshold": 1.0}, "publish_empty": True, "accessControl": {"aws.greengrass.ipc.mqttproxy": moved}})
    nucleus.wait_for(lambda: len(nucleus.published_to(f"plant7/{THING}/inference")) >= 3)
    code, stderr = component.stop()
    assert code == 0, stderr
    before, after = component.results(), component.results(f"plant7/{THING}/inference")
    assert {r["run_id"] for r in before} == {r["run_id"] for r in after}, "the agent restarted instead of applying the change"
    assert all(r["predictions"] for r in before)
    assert all(r["predictions"] == [] for r in after), "int8 scores top out at 255/256: nothing reaches a threshold of 1.0"
    assert f"plant7/{THING}/commands" in nucleus.subscriptions
    assert not nucleus.denied


@pytest.fixture
def model_1_0_1(tmp_path) -> tuple[Path, Path]:
    """A new model component version: the shipped bundle re-versioned 1.0.1 and signed with a test key."""
    bundle = tmp_path / "bundle-1.0.1"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    fields = json.loads((bundle / "manifest.json").read_text())
    fields.pop("files")
    write_manifest(bundle, {**fields, "version": "1.0.1"})
    generate_key(tmp_path / "test-signing.key", tmp_path / "test-signing.pub")
    sign_bundle(bundle, tmp_path / "test-signing.key")
    return model_component(tmp_path / "model-1", bundle) / "mnist-bundle", tmp_path / "test-signing.pub"


def test_new_model_version_swaps_live_and_defers_restarts_meanwhile(greengrass, model_1_0_1):
    new_bundle, test_key = model_1_0_1
    component = greengrass({**sample(loop=True, pace_fps=4), "updates": {"health_frames": 5}})
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results())
    shipped_version = component.results()[0]["model"]["version"]
    trusted = [str(REPO / "models" / "keys" / "dev-signing-2026-12b.pub"), str(test_key)]
    nucleus.update_configuration({"model": {"bundle": str(new_bundle), "trusted_keys": trusted}})
    nucleus.announce_component_update("deployment-1")  # arrives while the new model loads
    swapped = lambda: [m for m in nucleus.published_to(STATUS) if m.json()["state"] == "online" and m.json()["model"]["version"] == "1.0.1"]  # noqa: E731
    nucleus.wait_for(swapped)  # announced once the update manager has watched the new model and kept it
    nucleus.announce_component_update("deployment-2")  # nothing in progress now
    nucleus.wait_for(lambda: len(nucleus.deferrals) == 2)
    code, stderr = component.stop()
    assert code == 0, stderr
    versions = [r["model"]["version"] for r in component.results()]
    assert versions[0] == shipped_version != "1.0.1"
    assert versions[versions.index("1.0.1") :] == ["1.0.1"] * (len(versions) - versions.index("1.0.1")), "a frame went back to the old model"
    assert len({r["run_id"] for r in component.results()}) == 1
    first, second = nucleus.deferrals
    assert (first.deployment_id, first.message) == ("deployment-1", "model swap in progress") and first.recheck_after_ms > 0
    assert (second.deployment_id, second.recheck_after_ms) == ("deployment-2", 0)


def test_bad_auth_token_is_one_clear_line_and_nonzero_exit(greengrass):
    component = greengrass(sample(), auth_token="not-the-component-token")
    code, stderr = component.finish()
    assert code == 2
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert "refused the IPC connection" in stderr and "SVCUID" in stderr
    assert component.nucleus.connects == [False] and not component.nucleus.published


def test_access_denial_is_reported_not_retried(greengrass):
    component = greengrass({**sample(), "max_frames": 40, "topics": {"inference": "{prefix}/{thing}/results"}})
    code, stderr = component.finish()
    assert code == 0, stderr
    denied = [payload for operation, topic, payload in component.nucleus.denied if topic == f"edge/{THING}/results"]
    assert denied, "the results topic outside accessControl should have been refused"
    ids = [message["message_id"] for payload in denied for message in unbatch(payload)]
    assert len(ids) == len(set(ids)), "a refused message was sent again"
    assert f"refused PublishToIoTCore on edge/{THING}/results" in stderr and "accessControl" in stderr
    assert [m.json()["state"] for m in component.nucleus.published_to(STATUS)] == ["online", "offline"]


def test_fatal_fault_at_start_reports_errored(greengrass, tmp_path):
    component = greengrass({"source": {"spec": str(tmp_path / "gone.avi")}})
    code, stderr = component.finish()
    assert code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"edge-agent: source {tmp_path / 'gone.avi'}: no such video file")
    assert component.nucleus.states == ["ERRORED"]


def test_source_gone_for_good_while_serving_reports_errored(greengrass, tmp_path):
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: nucleus.states == ["RUNNING"] and component.results())
    nucleus.update_configuration({"source": {"spec": str(tmp_path / "unplugged.avi")}})
    code, stderr = component.finish()
    assert code == 2 and "Traceback" not in stderr
    assert "unplugged.avi: no such video file" in stderr.strip().splitlines()[-1]
    assert nucleus.states == ["RUNNING", "ERRORED"]


def test_status_command_from_iot_core(greengrass):
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: COMMANDS in nucleus.subscriptions and nucleus.published_to(STATUS))
    assert nucleus.push_iot_core_message(COMMANDS, b'{"command": "status"}') == 1
    nucleus.wait_for(lambda: len(nucleus.published_to(STATUS)) >= 2)
    component.stop()
    assert [m.json()["state"] for m in nucleus.published_to(STATUS)][:2] == ["online", "online"]


def test_link_rejects_for_good_and_reconnects_after_the_nucleus_restarts(tmp_path, monkeypatch):
    """The Link alone, as the outbox's sender drives it: refusals are final, a lost nucleus is not."""
    configuration = RECIPE["ComponentConfiguration"]["DefaultConfiguration"]
    nucleus = IpcServer(tmp_path / "ipc.socket", thing_name=THING, configuration=configuration).start()
    for name, value in nucleus.component_env().items():
        monkeypatch.setenv(name, value)
    link = IpcLink()
    link.connect(5)
    try:
        link.publish(INFERENCE, b'{"n": 1}', 1).result(5)
        with pytest.raises(PublishRejected, match="accessControl"):
            link.publish(f"edge/{THING}/elsewhere", b"{}", 1).result(5)
        nucleus.stop()
        nucleus = IpcServer(nucleus.socket_path, thing_name=THING, configuration=configuration, auth_token=nucleus.auth_token).start()
        outcomes = []
        for attempt in range(20):
            outcomes.append(link.publish(INFERENCE, b'{"n": 2}', 1).exception(5))
            if outcomes[-1] is None:
                break
        assert outcomes[-1] is None and not any(isinstance(o, PublishRejected) for o in outcomes)
        assert [m.payload for m in nucleus.published] == [b'{"n": 2}'] and link.reconnects >= 1
    finally:
        link.close()
        nucleus.stop()


def test_a_model_that_fails_to_load_is_reported_and_the_old_one_keeps_serving(greengrass, tmp_path):
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results())
    nucleus.update_configuration({"model": {"bundle": str(tmp_path / "no-such-bundle")}})
    nucleus.wait_for(lambda: any(m.json()["state"] == "degraded" for m in nucleus.published_to(STATUS)))
    served = len(component.results())
    nucleus.wait_for(lambda: len(component.results()) > served + 2)
    code, stderr = component.stop()
    assert code == 0, stderr
    degraded = next(m.json() for m in nucleus.published_to(STATUS) if m.json()["state"] == "degraded")
    assert "no-such-bundle" in degraded["reason"]
    assert len({r["model"]["version"] for r in component.results()}) == 1
    assert nucleus.states == ["RUNNING"]


def test_outside_a_nucleus_the_greengrass_transport_is_one_clear_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    process = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "agent", "run", "--transport", "greengrass"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines() == [
        "edge-agent: transport greengrass: AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT is not set; this transport runs only "
        "when a Greengrass nucleus starts the agent from its recipe (use --transport mqtt or console elsewhere)"
    ]


# --- a nucleus as the real one behaves -----------------------------------------------------------------------


def swapped_to(nucleus: IpcServer, version: str) -> list:
    return [m for m in nucleus.published_to(STATUS) if m.json()["state"] == "online" and m.json()["model"]["version"] == version]


@pytest.mark.parametrize("outage", ["protocol error", "socket gone for seconds"])
def test_the_control_connection_comes_back_with_its_subscriptions(greengrass, model_1_0_1, outage):
    new_bundle, test_key = model_1_0_1
    component = greengrass({**sample(loop=True, pace_fps=4), "updates": {"health_frames": 5}})
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results() and COMMANDS in nucleus.subscriptions)
    if outage == "protocol error":
        assert nucleus.protocol_error("SubscribeToConfigurationUpdate") == 1
    else:
        nucleus.stop()
        time.sleep(2)
        nucleus.start()
    followed = ("configuration:/", "component-updates", COMMANDS)
    nucleus.wait_for(lambda: all(nucleus.subscriptions.count(name) == 2 for name in followed))
    # A configuration change after the reconnect is applied, and its model swap is protected by a deferral.
    trusted = [str(REPO / "models" / "keys" / "dev-signing.pub"), str(test_key)]
    nucleus.update_configuration({"model": {"bundle": str(new_bundle), "trusted_keys": trusted}})
    nucleus.announce_component_update("deployment-1")
    nucleus.wait_for(lambda: swapped_to(nucleus, "1.0.1") and nucleus.deferrals)
    served = len(component.results())
    nucleus.wait_for(lambda: len(component.results()) > served)
    code, stderr = component.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "lost the control connection to the nucleus" in stderr
    assert outage != "protocol error" or "the nucleus sent PROTOCOL_ERROR" in stderr
    (deferral,) = nucleus.deferrals
    assert (deferral.deployment_id, deferral.message) == ("deployment-1", "model swap in progress")
    assert len({r["run_id"] for r in component.results()}) == 1, "the agent restarted instead of reconnecting"
    assert component.results()[-1]["model"]["version"] == "1.0.1"
    assert nucleus.states == ["RUNNING", "RUNNING"], "RUNNING is reported again on the new connection"


def test_a_late_answer_to_a_deferral_is_logged_and_serving_goes_on(greengrass):
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results() and "component-updates" in nucleus.subscriptions)
    nucleus.announce_component_update("deployment-1", timeout_s=0)  # the nucleus went ahead before any answer
    nucleus.wait_for(lambda: [e for e in nucleus.errors if e.operation == "DeferComponentUpdate"])
    served = len(component.results())
    nucleus.wait_for(lambda: len(component.results()) > served + 2)
    code, stderr = component.stop()
    assert code == 0, stderr
    assert nucleus.states == ["RUNNING"]
    assert LATE_DEFERRAL in stderr and "deployment-1" in stderr and "accessControl" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("socket_file", ["missing", "refusing"])
def test_start_waits_for_a_nucleus_that_is_still_starting(greengrass, socket_file):
    nucleus = greengrass.nucleus
    nucleus.stop(leave_socket=socket_file == "refusing")
    component = greengrass({**sample(), "max_frames": 20})
    warning = component.next_stderr_line()
    assert "cannot reach the Greengrass nucleus" in warning and "trying again" in warning
    nucleus.start()
    code, stderr = component.finish()
    assert code == 0, stderr
    assert "Traceback" not in stderr and stderr.count("cannot reach") == 1
    assert nucleus.states == ["RUNNING"] and component.results()


@pytest.mark.parametrize("socket_file", ["missing", "refusing"])
def test_a_nucleus_that_never_comes_is_one_line_and_exit_2(greengrass, socket_file):
    greengrass.nucleus.stop(leave_socket=socket_file == "refusing")
    component = greengrass(sample(), env={"EDGE_AGENT_GREENGRASS__WAIT_FOR_NUCLEUS_S": "1.5"})
    code, stderr = component.finish()
    assert code == 2 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "trying again for up to 1.5 s" in lines[0], stderr
    assert lines[1].startswith("edge-agent: transport greengrass: cannot reach the Greengrass nucleus at ")
    assert ("AWS_ERROR_FILE_INVALID_PATH" if socket_file == "missing" else "AWS_IO_SOCKET_CONNECTION_REFUSED") in lines[1]
    assert "greengrass.wait_for_nucleus_s" in lines[1] and "nucleus is running" in lines[1]


def test_thing_name_is_the_nucleus_s_unless_configured(greengrass):
    assert "--thing-name" not in RECIPE["Manifests"][0]["Lifecycle"]["Run"]["Script"], "the nucleus gives it: AWS_IOT_THING_NAME"
    component = greengrass({**sample(), "max_frames": 20})
    code, stderr = component.finish()
    assert code == 0, stderr
    assert {r["thing_name"] for r in component.results()} == {THING}
    configured = greengrass({**sample(), "max_frames": 20, "thing_name": "cam-9"})
    code, stderr = configured.finish()
    assert code == 0, stderr
    assert ("PublishToIoTCore", "edge/cam-9/status") in [(operation, topic) for operation, topic, _ in configured.nucleus.denied]


def test_a_full_spool_keeps_messages_in_the_outbox_until_the_nucleus_takes_them(greengrass):
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results())
    nucleus.spool_full = True
    refused = lambda: [e for e in nucleus.errors if e.operation == "PublishToIoTCore" and e.request["topicName"] == INFERENCE]  # noqa: E731
    nucleus.wait_for(lambda: len(refused()) >= 3)
    nucleus.spool_full = False
    refused_ids = {m["message_id"] for e in refused() for m in unbatch(base64.b64decode(e.request["payload"]))}
    nucleus.wait_for(lambda: refused_ids <= {r["message_id"] for r in component.results()})
    code, stderr = component.stop()
    assert code == 0, stderr
    assert SPOOL_FULL.split(": ")[1] in stderr and "dropped a message" not in stderr  # the outbox's warning (agent.transport.spooled)


def test_configuration_as_a_real_nucleus_sends_it(greengrass):
    """Numbers as floats, a deployment's events in one burst, unchanged values repeated."""
    component = greengrass(sample(loop=True, pace_fps=15))
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results() and COMMANDS in nucleus.subscriptions)
    assert nucleus.numbers_as_floats
    fetched, statuses = nucleus.operations.count("GetConfiguration"), len(nucleus.published_to(STATUS))
    unchanged = {key: value for key, value in nucleus.configuration.items() if key != "accessControl"}
    nucleus.update_configuration(unchanged, repeat_unchanged=True)  # a redeployment of the same configuration
    nucleus.update_configuration({"model": {"score_threshold": 1.0}, "publish_empty": True, "outbox": {"batch_max": 5}}, repeat_unchanged=True)
    nucleus.wait_for(lambda: component.results() and component.results()[-1]["predictions"] == [])
    events = len(leaves(unchanged)) + 3
    code, stderr = component.stop()
    assert code == 0, stderr
    assert nucleus.operations.count("GetConfiguration") - fetched < events / 4, "one fetch per burst, not per event"
    assert nucleus.subscriptions.count(COMMANDS) == 1 and nucleus.operations.count("SubscribeToComponentUpdates") == 1
    assert len(nucleus.published_to(STATUS)) == statuses + 1, "nothing but the offline status: no model update, no restart"
    assert stderr.count("takes effect when the component restarts") == 1 and "outbox.batch_max" in stderr
