"""The MQTT transport against a real Mosquitto with mutual TLS and the IoT policy's ACL.

Most cases run the real agent (`python -m agent run --transport mqtt`) as a process on the sample video and
watch what a subscriber receives; a few drive the transport in-process where the case is about one message.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import pytest
from broker import STOPPED_CLIENTS, Cable, Mosquitto, Observer, mosquitto, observer, pki  # noqa: F401 -- fixtures
from conftest import REPO, agent_env, assert_one_line_error, one_line_error, run_cli
from iot_service import IotService

from agent.messages import (
    Batch,
    InferenceResult,
    MetricsMessage,
    SequenceCounter,
    StatusMessage,
    unbatch,
)
from agent.schemas import schema_documents
from agent.settings import MqttSettings, Settings
from agent.topics import Topics
from agent.transport import mqtt

pytestmark = pytest.mark.broker

THING = "dev-1"
INFERENCE, STATUS, METRICS = (f"edge/{THING}/{kind}" for kind in ("inference", "status", "metrics"))
IOT_SERVICES = f"$aws/things/{THING}/#"
FAST_RECONNECT = {"min_reconnect_delay_s": 0.1, "max_reconnect_delay_s": 0.5}
SYSTEMD_UNIT = REPO / "deploy" / "systemd" / "edge-agent.service"


def systemd_stop_timeout_s() -> float:
    """How long systemd waits after SIGTERM before it SIGKILLs the agent (and the offline status is lost)."""
    return float(re.search(r"^TimeoutStopSec=(\d+)$", SYSTEMD_UNIT.read_text(), re.MULTILINE).group(1))


@pytest.fixture(scope="module")
def device(pki):
    return pki.client(THING)


@pytest.fixture
def cloud(mosquitto, pki):
    """IoT Jobs and Shadow answering the agent's requests at start-up (as IoT Core would), so runs end promptly."""
    if mosquitto.process is None:
        mosquitto.start()
    with IotService(mosquitto, pki) as service:
        yield service


def agent_command(broker: Mosquitto, device, *args: str, port: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "agent", "run", "--transport", "mqtt", "--thing-name", THING,
        "--endpoint", "127.0.0.1", "--port", str(port or broker.port),
        "--cert", str(device.cert), "--key", str(device.key), "--ca", str(broker.pki.ca.path), *args,
    ]  # fmt: skip


def agent_environment(outbox: Path, **settings: str) -> dict[str, str]:
    """The agent's environment: fast reconnects, this outbox, and `settings` as EDGE_AGENT_* variables."""
    return agent_env(
        **{
            "EDGE_AGENT_OUTBOX__PATH": str(outbox),
            "EDGE_AGENT_OUTBOX__RETRY_MAX_S": "1",
            "EDGE_AGENT_MQTT__MIN_RECONNECT_DELAY_S": "0.1",
            "EDGE_AGENT_MQTT__MAX_RECONNECT_DELAY_S": "0.5",
            "EDGE_AGENT_MQTT__CONNECT_TIMEOUT_S": "2",
            **settings,
        }
    )


def run_agent(broker, device, outbox: Path, *args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(agent_command(broker, device, *args), capture_output=True, text=True, timeout=timeout, env=env or agent_environment(outbox), cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


def start_agent(broker, device, outbox: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = agent_command(broker, device, *args, port=port)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env or agent_environment(outbox), cwd=REPO)


def stopped_in_time(agent: subprocess.Popen) -> str:
    """The agent's stderr once it has exited 0, within the time systemd gives a stopping service."""
    try:
        _, stderr = agent.communicate(timeout=systemd_stop_timeout_s())
    except subprocess.TimeoutExpired:
        agent.kill()
        _, stderr = agent.communicate()
        raise AssertionError(f"still running {systemd_stop_timeout_s():.0f} s later, when systemd would SIGKILL it: {stderr[-2000:]}") from None
    assert agent.returncode == 0, stderr
    return stderr


def states(messages) -> list[tuple[str, str | None]]:
    """(state, reason) of the status messages published while subscribed (a retained copy is an earlier run's)."""
    return [(p["state"], p.get("reason")) for p in (json.loads(m.payload) for m in messages if m.topic == STATUS and not m.retain)]


def results_count(stderr: str) -> int:
    """What `edge-agent run` says it produced (its last stderr line)."""
    return json.loads(stderr.strip().splitlines()[-1])["results"]


def payloads(messages, topic: str) -> list[dict]:
    """Every message the agent sent on `topic`, batches unpacked."""
    return [message for m in messages if m.topic == topic for message in unbatch(m.payload)]


def frames_of(messages) -> set[tuple[str, int]]:
    return {(p["run_id"], p["frame"]) for p in payloads(messages, INFERENCE)}


def assert_every_result_arrives(agent: subprocess.Popen, observer: Observer) -> None:
    """The agent finishes cleanly, and the subscriber has one result per result the agent says it produced."""
    _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 0, stderr
    expected = results_count(stderr)
    messages = observer.wait_for(lambda ms: len(frames_of(ms)) >= expected)
    assert len(frames_of(messages)) == expected, stderr


def test_results_arrive_on_their_topic_at_qos1_matching_the_schema(mosquitto, observer, cloud, device, tmp_path):
    observer.subscribe(f"edge/{THING}/#")
    done = run_agent(mosquitto, device, tmp_path / "outbox.db", "--max-frames", "30")
    expected = results_count(done.stderr)
    assert expected > 0
    messages = observer.wait_for(lambda ms: len(frames_of(ms)) >= expected)
    published = [m for m in messages if m.topic == INFERENCE]
    assert len(frames_of(messages)) == expected
    assert {m.qos for m in published} == {1}
    schemas = schema_documents()
    for message in published:
        kind = json.loads(message.payload)["kind"]
        jsonschema.validate(json.loads(message.payload), schemas["batch.schema.json" if kind == "batch" else "inference-result.schema.json"])
    for result in payloads(messages, INFERENCE):
        jsonschema.validate(result, schemas["inference-result.schema.json"])
        assert InferenceResult.model_validate(result).thing_name == THING
    states = [p["state"] for p in payloads(messages, STATUS)]
    assert states[0] == "online" and states[-1] == "offline"
    assert sqlite3.connect(tmp_path / "outbox.db").execute("SELECT count(*) FROM outbox").fetchone()[0] == 0


def test_status_is_retained_and_the_will_says_offline_when_the_agent_is_killed(mosquitto, pki, device, tmp_path):
    agent = None
    try:
        with Observer(mosquitto, pki, client_id="status-1") as first:
            first.subscribe(STATUS)
            agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--loop", "--pace-fps", "5")
            live = first.wait_for(lambda ms: ("online", None) in states(ms))
            assert ("online", None) in states(live), "agent never announced online"
            announced = next(json.loads(m.payload) for m in live if not m.retain)
        with Observer(mosquitto, pki, client_id="status-2") as late:  # joins afterwards: gets the retained copy
            late.subscribe(STATUS)
            [retained] = late.wait_for(lambda ms: len(ms) >= 1)
            assert retained.retain and json.loads(retained.payload)["state"] == "online"
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            messages = late.wait_for(lambda ms: len(ms) >= 2)
            will = json.loads(messages[-1].payload)
            assert (will["state"], will["reason"]) == ("offline", "connection lost")
            StatusMessage.model_validate(will)
            # A message of its own: receivers that drop duplicates by (run_id, sequence) keep it. Its sequence
            # is the one before the first online status (README, "What it publishes").
            assert will["message_id"] != announced["message_id"]
            assert (will["run_id"], will["sequence"]) == (announced["run_id"], announced["sequence"] - 1)
        with Observer(mosquitto, pki, client_id="status-3") as after:
            after.subscribe(STATUS)
            [retained] = after.wait_for(lambda ms: len(ms) >= 1)
            assert retained.retain and json.loads(retained.payload)["state"] == "offline"
    finally:
        if agent is not None:
            agent.kill()
            agent.wait()


# -- a broker that is not IoT Core: Jobs and Shadow requests get no answer ----------------------------------


def test_against_a_broker_without_jobs_or_shadow_a_run_ends_when_its_frames_are_done(mosquitto, observer, device, tmp_path):
    """Plain Mosquitto, no stand-in: the Jobs and Shadow requests are never answered, and need not be."""
    observer.subscribe(f"edge/{THING}/#")
    observer.subscribe(IOT_SERVICES)
    agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--max-frames", "20")
    try:
        observer.wait_for(lambda ms: ("online", None) in states(ms))
        stderr = stopped_in_time(agent)
    finally:
        agent.kill()
        agent.wait()
    messages = observer.wait_for(lambda ms: states(ms)[-1:] == [("offline", "stopped")], timeout_s=10)
    assert states(messages)[-1] == ("offline", "stopped")
    assert {m.topic for m in messages} >= {f"$aws/things/{THING}/jobs/start-next", f"$aws/things/{THING}/shadow/get"}  # asked, unanswered
    assert len(frames_of(messages)) == results_count(stderr)
    assert f"connected to 127.0.0.1:{mosquitto.port} as client id {THING}" in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_against_a_broker_without_jobs_or_shadow_a_stop_signal_ends_the_run_and_says_offline(mosquitto, observer, device, tmp_path, signum):
    """SIGTERM (systemd, Greengrass) and Ctrl-C stop within the unit's TimeoutStopSec, with the offline status sent."""
    observer.subscribe(f"edge/{THING}/#")
    observer.subscribe(IOT_SERVICES)
    agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--loop", "--pace-fps", "30")
    try:
        observer.wait_for(lambda ms: {m.topic for m in ms} >= {INFERENCE, f"$aws/things/{THING}/jobs/start-next", f"$aws/things/{THING}/shadow/get"})
        agent.send_signal(signum)
        stopped_in_time(agent)
    finally:
        agent.kill()
        agent.wait()
    messages = observer.wait_for(lambda ms: states(ms)[-1:] == [("offline", "stopped")], timeout_s=10)
    assert states(messages)[-1] == ("offline", "stopped")


@pytest.mark.parametrize(
    "jobs, shadow, asked",
    [("false", "false", set()), ("true", "false", {"jobs"}), ("false", "true", {"shadow"})],
)
def test_jobs_and_shadow_are_switched_by_their_own_settings(mosquitto, observer, device, tmp_path, jobs, shadow, asked):
    observer.subscribe(INFERENCE)
    observer.subscribe(IOT_SERVICES)
    env = agent_environment(tmp_path / "outbox.db", EDGE_AGENT_IOT__JOBS=jobs, EDGE_AGENT_IOT__SHADOW=shadow)
    done = run_agent(mosquitto, device, tmp_path / "outbox.db", "--max-frames", "20", env=env)
    messages = observer.wait_for(lambda ms: len(frames_of(ms)) >= results_count(done.stderr))
    assert len(frames_of(messages)) == results_count(done.stderr)
    time.sleep(0.5)  # a request sent at start would have arrived long before the last result
    assert {m.topic.split("/")[3] for m in observer.messages if m.topic.startswith("$aws/")} == asked


def test_a_stop_signal_while_the_first_connection_attempt_hangs_is_not_held_up(device, mosquitto, tmp_path):
    """An endpoint that accepts TCP and then says nothing: start-up waits for it, but a stop signal ends the wait."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        env = agent_environment(tmp_path / "outbox.db", EDGE_AGENT_MQTT__CONNECT_TIMEOUT_S="120")
        agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--loop", port=silent.getsockname()[1], env=env)
        try:
            connection, _ = silent.accept()  # the agent is in its first attempt now
            with connection:
                agent.send_signal(signal.SIGTERM)
                stderr = stopped_in_time(agent)
        finally:
            agent.kill()
            agent.wait()
    assert "stopping while disconnected" in stderr


@pytest.mark.parametrize("ca", ["rogue", "amazon"])
def test_a_server_certificate_the_ca_does_not_verify_is_one_line(mosquitto, pki, device, tmp_path, ca):
    """A wrong --ca, or Amazon's root (the default) left in place against another broker: nothing could ever connect."""
    args = agent_command(mosquitto, device, "--max-frames", "1")[3:]
    if ca == "rogue":
        args[args.index("--ca") + 1] = str(pki.rogue.path)
    else:
        del args[args.index("--ca") : args.index("--ca") + 2]
    line = one_line_error(run_cli(*args, env=agent_environment(tmp_path / "outbox.db")))
    assert "mqtt.ca" in line and "not verified" in line and "--ca" in line


@pytest.fixture(scope="module")
def bad_tls_files(pki, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """--cert/--key/--ca replacements, by case: each is one mistake a user makes with the device's files."""
    folder = tmp_path_factory.mktemp("bad-tls")
    device, other = pki.client(THING), pki.client("another-thing")
    text, der = folder / "notes.txt", folder / "device.der"
    text.write_text("the certificate is in the email\n")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der.write_bytes(x509.load_pem_x509_certificate(device.cert.read_bytes()).public_bytes(Encoding.DER))
    return {
        "cert not PEM": {"cert": der},
        "key not PEM": {"key": text},
        "CA not PEM": {"ca": text},
        "key of another certificate": {"key": other.key},
        "cert and key swapped": {"cert": device.key, "key": device.cert},
    }


@pytest.mark.parametrize(
    "case, needles",
    [
        ("cert not PEM", ["mqtt.cert", "not a PEM device certificate", "openssl x509 -inform der"]),
        ("key not PEM", ["mqtt.key", "not a PEM private key"]),
        ("CA not PEM", ["mqtt.ca", "not a PEM CA certificate"]),
        ("key of another certificate", ["mqtt.key", "is not the private key of mqtt.cert"]),
        ("cert and key swapped", ["mqtt.cert", "swapped"]),
    ],
)
def test_tls_files_that_cannot_work_are_one_line_naming_the_file(mosquitto, device, bad_tls_files, tmp_path, case, needles):
    args = agent_command(mosquitto, device, "--max-frames", "1")[3:]
    for setting, path in bad_tls_files[case].items():
        args[args.index(f"--{setting}") + 1] = str(path)
    assert_one_line_error(run_cli(*args, env=agent_environment(tmp_path / "outbox.db")), *needles)


def test_a_second_agent_on_the_same_outbox_refuses_in_one_line(mosquitto, observer, cloud, device, tmp_path):
    observer.subscribe(STATUS)
    outbox = tmp_path / "outbox.db"
    first = start_agent(mosquitto, device, outbox, "--loop", "--pace-fps", "10")
    try:
        observer.wait_for(lambda ms: ("online", None) in states(ms))
        second = run_cli(*agent_command(mosquitto, device, "--max-frames", "1")[3:], env=agent_environment(outbox))
        assert_one_line_error(second, f"outbox.path {outbox}", f"another edge-agent (pid {first.pid})")
        assert first.poll() is None  # the first one carries on
        first.send_signal(signal.SIGTERM)
        stopped_in_time(first)
    finally:
        first.kill()
        first.wait()
    run_agent(mosquitto, device, outbox, "--max-frames", "1")  # and once it has stopped, the outbox is free


@pytest.fixture
def cable(mosquitto) -> Cable:
    """The device's way to the broker, which the test can cut: the observer stays connected throughout."""
    link = Cable(mosquitto).restore()
    yield link
    link.cut()


def test_broker_down_at_start_then_up(mosquitto, observer, cloud, cable, device, tmp_path):
    observer.subscribe(INFERENCE)
    cable.cut()
    mosquitto.stop()
    agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--max-frames", "40", "--pace-fps", "20", port=cable.port)
    try:
        time.sleep(1.0)
        assert agent.poll() is None, agent.stderr.read()
        mosquitto.start()
        observer.wait_ready()
        cloud.wait_ready()
        cable.restore()
        assert_every_result_arrives(agent, observer)
    finally:
        agent.kill()
        if mosquitto.process is None:
            mosquitto.start()


def test_broker_restarted_mid_run_loses_nothing(mosquitto, observer, cloud, cable, device, tmp_path):
    observer.subscribe(INFERENCE)
    agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--max-frames", "60", "--pace-fps", "20", port=cable.port)
    try:
        observer.wait_for(lambda ms: len(ms) >= 5)
        cable.cut()  # the device sees its connection reset, then refused, as when the broker restarts
        mosquitto.restart()
        observer.wait_ready()
        cloud.wait_ready()
        cable.restore()
        assert_every_result_arrives(agent, observer)
    finally:
        agent.kill()


def test_agent_killed_while_broker_down_resends_everything_after_restart(mosquitto, observer, cloud, device, tmp_path):
    """Every result accepted before a SIGKILL arrives once broker and agent are back: no sequence number is missing."""
    observer.subscribe(INFERENCE)
    outbox = tmp_path / "outbox.db"
    mosquitto.stop()
    agent = start_agent(mosquitto, device, outbox, "--loop", "--pace-fps", "50")
    try:
        deadline = time.monotonic() + 30
        spooled = 0
        while spooled < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                with sqlite3.connect(outbox) as db:
                    spooled = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            except sqlite3.OperationalError:  # the agent has not created it yet
                pass
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    finally:
        agent.kill()
    with sqlite3.connect(outbox) as db:
        killed_run = [json.loads(p) for (p,) in db.execute("SELECT payload FROM outbox WHERE topic = ?", (INFERENCE,))]
    assert len(killed_run) >= 40
    run_id = killed_run[0]["run_id"]
    last_sequence = max(p["sequence"] for p in killed_run)
    mosquitto.start()
    observer.wait_ready()
    cloud.wait_ready()
    run_agent(mosquitto, device, outbox, "--max-frames", "30")
    # sequence 1 is the last will, 2 the online status; every result after them, up to the last one accepted, must be there
    results = set(range(3, last_sequence + 1))
    messages = observer.wait_for(lambda ms: {p["sequence"] for p in payloads(ms, INFERENCE) if p["run_id"] == run_id} >= results)
    received = {p["sequence"] for p in payloads(messages, INFERENCE) if p["run_id"] == run_id}
    assert results <= received


def test_client_certificate_from_another_ca_is_refused_with_one_line(mosquitto, pki, tmp_path):
    rogue = pki.rogue.issue(THING)
    done = run_cli(*agent_command(mosquitto, rogue, "--max-frames", "1")[3:], env=agent_environment(tmp_path / "outbox.db"))
    assert_one_line_error(done, "mqtt.cert", "refused our certificate")


def test_an_endpoint_that_names_no_host_is_one_line(mosquitto, device, tmp_path):
    args = agent_command(mosquitto, device, "--max-frames", "1")[3:]
    args[args.index("--endpoint") + 1] = "no-such-host.invalid"
    assert_one_line_error(run_cli(*args, env=agent_environment(tmp_path / "outbox.db")), "mqtt.endpoint", "describe-endpoint")


@pytest.mark.parametrize("setting", ["cert", "key"])
def test_missing_certificate_or_key_is_one_line_naming_the_setting(mosquitto, device, tmp_path, setting):
    args = agent_command(mosquitto, device, "--max-frames", "1")[3:]
    args[args.index(f"--{setting}") + 1] = str(tmp_path / "missing.pem")
    assert_one_line_error(run_cli(*args, env=agent_environment(tmp_path / "outbox.db")), f"mqtt.{setting} {tmp_path / 'missing.pem'}: no such file")


# -- in-process: one message at a time -------------------------------------------------------------------


def transport_settings(broker: Mosquitto, device, tmp_path: Path, **overrides) -> Settings:
    return Settings.model_validate(
        {
            "thing_name": THING,
            "transport": "mqtt",
            "mqtt": {"endpoint": "127.0.0.1", "port": broker.port, "cert": str(device.cert), "key": str(device.key), "ca": str(broker.pki.ca.path), **FAST_RECONNECT},
            "outbox": {"path": str(tmp_path / "outbox.db"), "retry_max_s": 1},
            **overrides,
        }
    )


def metrics_message(sequence: SequenceCounter) -> MetricsMessage:
    return MetricsMessage(**sequence.envelope(), interval_s=1, frames_read=1, frames_dropped=0, frames_corrupt=0, results=1, fps=1, latency_p50_ms=1, latency_p99_ms=1)


def open_transport(settings: Settings) -> tuple[mqtt.MqttTransport, SequenceCounter]:
    sequence = SequenceCounter(THING)
    transport = mqtt.from_settings(settings, Topics.for_thing(settings.topics, THING))
    will = StatusMessage(**sequence.envelope(), state="offline", reason="connection lost", agent_version="test")
    transport.start(StatusMessage(**sequence.envelope(), state="online", agent_version="test"), will)
    return transport, sequence


def published_while_the_link_is_down(settings: Settings, cable, count: int) -> tuple[mqtt.MqttTransport, SequenceCounter, list[MetricsMessage]]:
    """A transport through the cable that accepts `count` metrics messages while the cable is cut, then has it back."""
    cable.cut()
    settings.mqtt.port = cable.port
    transport, sequence = open_transport(settings)
    sent = [metrics_message(sequence) for _ in range(count)]
    for message in sent:
        transport.publish(message)
    cable.restore()
    return transport, sequence, sent


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_publish_the_policy_denies_is_reported_and_dropped_not_retried(mosquitto, observer, device, tmp_path, caplog):
    observer.subscribe(f"edge/{THING}/#")
    settings = transport_settings(mosquitto, device, tmp_path, topics={"metrics": "{prefix}/{thing}/not-in-policy"})
    transport, sequence = open_transport(settings)
    try:
        transport.publish(metrics_message(sequence))
        wait_until(lambda: transport.stats().failed == 1 and transport.stats().queued == 0)  # deleted just after it is counted
        stats = transport.stats()
        assert (stats.failed, stats.dropped, stats.queued, stats.acknowledged) == (1, 1, 0, 0)
        assert any("not-in-policy" in r.message and "NOT_AUTHORIZED" in r.message for r in caplog.records)
        time.sleep(1.5)  # longer than the retry backoff: a retry would show up as another send
        assert transport.stats().sent == 1
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"))
    assert not observer.on(f"edge/{THING}/not-in-policy")


def test_an_oversized_payload_never_reaches_the_outbox_or_the_network(mosquitto, device, tmp_path):
    transport, sequence = open_transport(transport_settings(mosquitto, device, tmp_path))
    try:
        oversized = metrics_message(sequence).model_copy(update={"thing_name": "x" * (130 * 1024)})
        transport.publish(oversized)
        stats = transport.stats()
        assert (stats.failed, stats.dropped, stats.queued, stats.sent) == (1, 1, 0, 0)
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"))


def test_commands_subscription_survives_a_broker_restart(mosquitto, observer, device, tmp_path):
    transport, sequence = open_transport(transport_settings(mosquitto, device, tmp_path))
    received: list[bytes] = []
    try:
        transport.link.subscribe(f"edge/{THING}/commands", lambda topic, payload: received.append(payload)).result(10)
        observer.publish(f"edge/{THING}/commands", b"one").result(10)
        wait_until(lambda: received == [b"one"])
        mosquitto.restart()
        wait_until(lambda: transport.link.reconnects >= 1 and transport.link.connected)
        wait_until(lambda: (observer.publish(f"edge/{THING}/commands", b"two").result(10), b"two" in received)[1], timeout_s=10)
        assert received[0] == b"one" and b"two" in received
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"))


def test_a_full_outbox_drops_the_oldest_and_reports_it(mosquitto, cable, device, tmp_path):
    """With the link down and a tiny outbox, results keep being accepted; the oldest go, counted in the stats."""
    cable.cut()
    settings = transport_settings(mosquitto, device, tmp_path, outbox={"path": str(tmp_path / "outbox.db"), "max_mb": 0.01})
    settings.mqtt.port = cable.port
    transport, sequence = open_transport(settings)
    try:
        for _ in range(100):
            transport.publish(metrics_message(sequence))
        stats = transport.stats()
        assert stats.dropped > 0 and stats.failed == 0
        assert transport.outbox.stats().bytes <= 0.01 * 1024 * 1024
        cable.restore()  # what was kept is then delivered
        wait_until(lambda: transport.stats().queued == 0)
        assert transport.stats().queued == 0
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"), timeout_s=1)


def test_shadow_service_client_shares_the_connection(mosquitto, observer, device, tmp_path):
    """The Jobs/Shadow V2 clients run on `link.client`, and the policy lets the device use its own shadow topics."""
    from awscrt import mqtt_request_response
    from awsiot import iotshadow

    observer.subscribe(f"$aws/things/{THING}/shadow/get")
    transport, sequence = open_transport(transport_settings(mosquitto, device, tmp_path))
    try:
        options = mqtt_request_response.ClientOptions(max_request_response_subscriptions=2, max_streaming_subscriptions=2, operation_timeout_in_seconds=10)
        shadow = iotshadow.IotShadowClientV2(transport.link.client, options)
        reply = shadow.get_shadow(iotshadow.GetShadowRequest(thing_name=THING))
        [request] = observer.wait_for(lambda ms: any(m.topic.endswith("/shadow/get") for m in ms))
        token = json.loads(request.payload)["clientToken"]
        document = {"state": {"reported": {"model": "1.0.0"}}, "version": 3, "timestamp": 1700000000, "clientToken": token}
        observer.publish(f"$aws/things/{THING}/shadow/get/accepted", json.dumps(document).encode()).result(10)
        answer = reply.result(10)
        assert (answer.state.reported, answer.version) == ({"model": "1.0.0"}, 3)
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"))


def test_a_backlog_larger_than_memory_holds_is_read_back_from_disk_in_order(mosquitto, observer, cable, device, tmp_path):
    """Link down, more accepted than the sender keeps in memory: every message still goes out once it is back."""
    observer.subscribe(METRICS)
    outbox = {"path": str(tmp_path / "outbox.db"), "max_in_flight": 50, "max_publishes_per_s": 1e6, "max_bytes_per_s": 1e9}
    settings = transport_settings(mosquitto, device, tmp_path, outbox=outbox)
    settings.mqtt.flow_control = "none"  # the SDK's IoT Core flow control would pace this at 100/s
    transport, sequence, sent = published_while_the_link_is_down(settings, cable, 1500)
    try:
        expected = {m.sequence for m in sent}
        messages = observer.wait_for(lambda ms: {p["sequence"] for p in payloads(ms, METRICS)} >= expected, timeout_s=60)
        arrived = [p["sequence"] for p in payloads(messages, METRICS)]
        assert set(arrived) >= expected
        first_arrivals = list(dict.fromkeys(arrived))
        assert first_arrivals == sorted(first_arrivals)  # oldest first
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"), timeout_s=1)


@pytest.mark.parametrize("batch_max", [10, 1])
def test_a_backlog_goes_out_in_batches_of_at_most_batch_max_each_message_once_in_order(mosquitto, observer, cable, device, tmp_path, batch_max, caplog):
    caplog.set_level(logging.INFO)
    observer.subscribe(METRICS)
    settings = transport_settings(mosquitto, device, tmp_path, outbox={"path": str(tmp_path / "outbox.db"), "batch_max": batch_max})
    transport, sequence, sent = published_while_the_link_is_down(settings, cable, 95)
    try:
        messages = observer.wait_for(lambda ms: len(payloads(ms, METRICS)) >= len(sent), timeout_s=30)
        wait_until(lambda: transport.stats().queued == 0)
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"), timeout_s=1)
    draining = [r for r in caplog.records if r.levelname == "INFO" and re.fullmatch(r"outbox draining \d+ messages", r.message)]
    assert draining and 0 < draining[0].messages <= len(sent)  # the operator hears of the backlog once the link is up
    assert [p["sequence"] for p in payloads(messages, METRICS)] == [m.sequence for m in sent]
    kinds = {json.loads(m.payload)["kind"] for m in messages}
    if batch_max == 1:
        assert kinds == {"metrics"} and len(messages) == len(sent)
    else:
        assert kinds <= {"batch", "metrics"} and len(messages) <= 2 * -(-len(sent) // batch_max)
        batches = [Batch.model_validate_json(m.payload) for m in messages if json.loads(m.payload)["kind"] == "batch"]
        assert batches and all(2 <= len(b.messages) <= batch_max for b in batches)


def test_a_refused_batch_drops_each_of_its_messages_once(mosquitto, observer, cable, device, tmp_path):
    settings = transport_settings(mosquitto, device, tmp_path, topics={"metrics": "{prefix}/{thing}/not-in-policy"})
    # The first goes alone (it wakes the sender), the rest in batches of 10.
    transport, sequence, _ = published_while_the_link_is_down(settings, cable, 21)
    try:
        wait_until(lambda: transport.stats().failed == 21)
        time.sleep(1.5)  # longer than the retry backoff: a retry would show up as more sends
        stats = transport.stats()
        assert (stats.sent, stats.failed, stats.dropped, stats.queued, stats.acknowledged) == (21, 21, 21, 0, 0)
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"), timeout_s=1)


class TakeoverEndpoint:
    """IoT Core's side of a client-id takeover, on the wire: a TLS endpoint (the test server certificate, client
    certificates required) that answers an MQTT5 CONNECT with a successful CONNACK and, on `take_over()`, sends
    DISCONNECT with reason code 0x8E (Session taken over) and closes, as IoT Core does when another client
    connects with the same client id. (Mosquitto 2.0.11 just closes the old connection; 2.0.15 sends 0x8E.)"""

    CONNACK = bytes([0x20, 3, 0, 0, 0])  # flags 0, reason SUCCESS, no properties
    SESSION_TAKEN_OVER = bytes([0xE0, 2, 0x8E, 0])

    def __init__(self, pki):
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(pki.server.cert, pki.server.key)
        self._tls.load_verify_locations(pki.ca.path)
        self._tls.verify_mode = ssl.CERT_REQUIRED
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._connected: queue.Queue = queue.Queue()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self._server.accept()
                raw.settimeout(10)
                client = self._tls.wrap_socket(raw, server_side=True)
                self._open.append(client)
                self._read_packet(client)  # CONNECT
                client.sendall(self.CONNACK)
                self._connected.put(client)
            except OSError:
                if self._server.fileno() < 0:
                    return

    @staticmethod
    def _read_packet(client: ssl.SSLSocket) -> bytes:
        client.recv(1)  # packet type
        length, shift = 0, 0
        while True:  # variable-length remaining length
            byte = client.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        body = b""
        while len(body) < length:
            body += client.recv(length - len(body))
        return body

    def take_over(self) -> None:
        client = self._connected.get(timeout=10)
        client.sendall(self.SESSION_TAKEN_OVER)
        client.close()

    def close(self) -> None:
        self._server.close()
        for client in self._open:
            client.close()


def test_a_takeover_of_our_client_id_is_a_warning_naming_it(pki, device, caplog):
    """The broker drops us because another client connected with our client id (a second agent with this thing name)."""
    caplog.set_level(logging.INFO)
    endpoint = TakeoverEndpoint(pki)
    settings = MqttSettings(endpoint="127.0.0.1", port=endpoint.port, cert=device.cert, key=device.key, ca=pki.ca.path, **FAST_RECONNECT)
    link = mqtt.MqttLink(settings, client_id=THING)
    try:
        link.connect(timeout_s=10)
        assert link.connected
        endpoint.take_over()
        wait_until(lambda: link.reconnects >= 1)
    finally:
        STOPPED_CLIENTS.append(link.client)
        link.close()
        endpoint.close()
    messages = [(r.levelname, r.message) for r in caplog.records if r.name == "agent.transport.mqtt"]
    assert ("INFO", f"connected to 127.0.0.1:{endpoint.port} as client id {THING}") in messages
    [warning] = [message for level, message in messages if level == "WARNING"]
    assert "SESSION_TAKEN_OVER" in warning and f"another client connected with our client id '{THING}'" in warning
    assert ("INFO", f"reconnected to 127.0.0.1:{endpoint.port} as client id {THING}") in messages


def test_after_a_reconnect_the_latest_status_is_retained_again(mosquitto, pki, cable, device, tmp_path):
    """The will replaces the status while the link is down; on reconnect the latest status (not the first) returns."""
    settings = transport_settings(mosquitto, device, tmp_path)
    settings.mqtt.port = cable.port
    transport, sequence = open_transport(settings)
    try:
        with Observer(mosquitto, pki, client_id="status-before") as before:
            before.subscribe(STATUS)
            transport.publish(StatusMessage(**sequence.envelope(), state="degraded", agent_version="test", reason="camera stalled"))
            before.wait_for(lambda ms: ms and json.loads(ms[-1].payload)["state"] == "degraded")
        cable.cut()
        with Observer(mosquitto, pki, client_id="status-will") as watcher:
            watcher.subscribe(STATUS)
            assert json.loads(watcher.wait_for(lambda ms: ms)[-1].payload)["state"] == "offline"
            cable.restore()
            messages = watcher.wait_for(lambda ms: json.loads(ms[-1].payload)["state"] != "offline")
        latest = json.loads(messages[-1].payload)
        assert (latest["state"], latest["reason"]) == ("degraded", "camera stalled")
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"), timeout_s=1)
