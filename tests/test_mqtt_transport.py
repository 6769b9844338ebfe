"""The MQTT transport against a real Mosquitto with mutual TLS and the IoT policy's ACL.

Most cases run the real agent (`python -m agent run --transport mqtt`) as a process on the sample video and
watch what a subscriber receives; a few drive the transport in-process where the case is about one message.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from broker import Cable, Mosquitto, Observer, mosquitto, observer, pki  # noqa: F401 -- fixtures
from conftest import REPO, agent_env, assert_one_line_error, run_cli
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
from agent.settings import Settings
from agent.topics import Topics
from agent.transport import mqtt

pytestmark = pytest.mark.broker

THING = "dev-1"
INFERENCE, STATUS, METRICS = (f"edge/{THING}/{kind}" for kind in ("inference", "status", "metrics"))
FAST_RECONNECT = {"min_reconnect_delay_s": 0.1, "max_reconnect_delay_s": 0.5}


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


def agent_environment(outbox: Path) -> dict[str, str]:
    return agent_env(
        EDGE_AGENT_OUTBOX__PATH=str(outbox),
        EDGE_AGENT_OUTBOX__RETRY_MAX_S="1",
        EDGE_AGENT_MQTT__MIN_RECONNECT_DELAY_S="0.1",
        EDGE_AGENT_MQTT__MAX_RECONNECT_DELAY_S="0.5",
        EDGE_AGENT_MQTT__CONNECT_TIMEOUT_S="2",
    )


def run_agent(broker, device, outbox: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    done = subprocess.run(agent_command(broker, device, *args), capture_output=True, text=True, timeout=timeout, env=agent_environment(outbox), cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done


def start_agent(broker, device, outbox: Path, *args: str, port: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(agent_command(broker, device, *args, port=port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=agent_environment(outbox), cwd=REPO)


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
    agent = start_agent(mosquitto, device, tmp_path / "outbox.db", "--loop", "--pace-fps", "5")
    try:
        with Observer(mosquitto, pki, client_id="status-1") as first:
            first.subscribe(STATUS)
            online = first.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "online" for m in ms))
            assert online, "agent never announced online"
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
        with Observer(mosquitto, pki, client_id="status-3") as after:
            after.subscribe(STATUS)
            [retained] = after.wait_for(lambda ms: len(ms) >= 1)
            assert retained.retain and json.loads(retained.payload)["state"] == "offline"
    finally:
        agent.kill()
        agent.wait()


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
    messages = observer.wait_for(lambda ms: {p["sequence"] for p in payloads(ms, INFERENCE) if p["run_id"] == run_id} >= set(range(2, last_sequence + 1)))
    received = {p["sequence"] for p in payloads(messages, INFERENCE) if p["run_id"] == run_id}
    # sequence 1 is the online status; every result after it, up to the last one accepted, must be there
    assert set(range(2, last_sequence + 1)) <= received


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
def test_a_backlog_goes_out_in_batches_of_at_most_batch_max_each_message_once_in_order(mosquitto, observer, cable, device, tmp_path, batch_max):
    observer.subscribe(METRICS)
    settings = transport_settings(mosquitto, device, tmp_path, outbox={"path": str(tmp_path / "outbox.db"), "batch_max": batch_max})
    transport, sequence, sent = published_while_the_link_is_down(settings, cable, 95)
    try:
        messages = observer.wait_for(lambda ms: len(payloads(ms, METRICS)) >= len(sent), timeout_s=30)
        wait_until(lambda: transport.stats().queued == 0)
    finally:
        transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="test"), timeout_s=1)
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
