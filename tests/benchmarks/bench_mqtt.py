"""Benchmark (not a test; pytest does not collect it): the outbox + MQTT transport against local Mosquitto.

    .venv/bin/python tests/benchmarks/bench_mqtt.py [--results 20000] [--spooled 100000] [--latency-s 10]

Prints JSON figures:
- sustained QoS1 throughput through outbox + MqttTransport vs the bare awscrt MQTT5 client, same broker, same
  run, flow control off and rate limits lifted (the local broker is the only limit);
- result-to-PUBACK latency p50/p99 at 30 results/s with the default (IoT Core) flow control and quotas;
- outbox bytes per spooled result, and the time to deliver 100,000 spooled results after a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the broker fixtures

from broker import Mosquitto, Pki  # noqa: E402

from agent.messages import (  # noqa: E402
    Box,
    InferenceResult,
    ModelRef,
    Prediction,
    SequenceCounter,
    StageLatency,
    StatusMessage,
    unbatch,
)
from agent.settings import Settings  # noqa: E402
from agent.topics import Topics  # noqa: E402
from agent.transport import mqtt  # noqa: E402
from agent.transport.outbox import open_outbox  # noqa: E402

THING = "bench-1"
UNLIMITED = {"max_publishes_per_s": 1e9, "max_bytes_per_s": 1e12, "max_in_flight": 1000}


def results(n: int, sequence: SequenceCounter) -> list[InferenceResult]:
    """`n` realistic results (three digits found in a frame), built before timing starts."""
    model = ModelRef(name="mnist-int8", version="1.0.0", sha256="0" * 64)
    predictions = [Prediction(label=str(d), class_index=d, score=0.97, box=Box(x=40 * d, y=60, w=28, h=28)) for d in (3, 5, 8)]
    now = datetime.now(timezone.utc)
    latency = StageLatency(find_ms=1.2, classify_ms=0.3, total_ms=1.6)
    return [
        InferenceResult(**sequence.envelope(), source="camera:0", frame=i, captured_at=now, model=model, task="mnist-digits", predictions=predictions, latency=latency)
        for i in range(n)
    ]


def settings(broker: Mosquitto, device, folder: Path, flow_control: str = "none", outbox: dict | None = None) -> Settings:
    return Settings.model_validate(
        {
            "thing_name": THING,
            "transport": "mqtt",
            "mqtt": {"endpoint": "127.0.0.1", "port": broker.port, "cert": str(device.cert), "key": str(device.key), "ca": str(broker.pki.ca.path), "flow_control": flow_control},
            "outbox": {"path": str(folder / "outbox.db"), **(outbox or {})},
        }
    )


def open_transport(config: Settings, sequence: SequenceCounter) -> mqtt.MqttTransport:
    transport = mqtt.from_settings(config, Topics.for_thing(config.topics, THING))
    transport.start(StatusMessage(**sequence.envelope(), state="online", agent_version="bench"))
    while not transport.link.connected:
        time.sleep(0.01)
    return transport


def wait_delivered(transport: mqtt.MqttTransport, expected: int) -> None:
    while transport.stats().acknowledged < expected:
        time.sleep(0.002)


def bare_client_rate(broker: Mosquitto, device, payloads: list[bytes]) -> float:
    """Messages/s for awscrt's MQTT5 client alone: publish everything, wait for the last PUBACK."""
    connected = threading.Event()
    client = mqtt5_client_builder.mtls_from_path(
        cert_filepath=str(device.cert), pri_key_filepath=str(device.key), ca_filepath=str(broker.pki.ca.path),
        endpoint="127.0.0.1", port=broker.port, client_id=THING,
        extended_validation_and_flow_control_options=mqtt5.ExtendedValidationAndFlowControlOptions.NONE,
        on_lifecycle_connection_success=lambda data: connected.set(),
    )  # fmt: skip
    client.start()
    connected.wait(10)
    topic = f"edge/{THING}/inference"
    start = time.perf_counter()
    futures = [client.publish(mqtt5.PublishPacket(topic=topic, payload=p, qos=mqtt5.QoS.AT_LEAST_ONCE)) for p in payloads]
    for future in futures:
        future.result(60)
    elapsed = time.perf_counter() - start
    client.stop()
    time.sleep(0.2)
    return len(payloads) / elapsed


def transport_rate(broker: Mosquitto, device, folder: Path, messages: list[InferenceResult], sequence: SequenceCounter) -> dict:
    transport = open_transport(settings(broker, device, folder, outbox=UNLIMITED), sequence)
    start = time.perf_counter()
    for message in messages:
        transport.publish(message)
    accepted = time.perf_counter() - start
    wait_delivered(transport, len(messages))
    elapsed = time.perf_counter() - start
    transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="bench"))
    return {"results_per_s": len(messages) / elapsed, "publish_call_us": accepted / len(messages) * 1e6}


def latency_at(broker: Mosquitto, device, folder: Path, rate: float, seconds: float, sequence: SequenceCounter) -> dict:
    """Result-to-PUBACK at a camera's pace, with the deployed defaults (IoT Core flow control and quotas)."""
    transport = open_transport(settings(broker, device, folder, flow_control="iot-core"), sequence)
    acked: dict[int, float] = {}
    publish = transport.link.publish

    def timed(topic, payload, qos, retain=False):  # measurement only: note when each PUBACK arrives
        future = publish(topic, payload, qos, retain)
        frames = [message.get("frame", -1) for message in unbatch(payload)]

        def note(done):
            for frame in frames:
                acked.setdefault(frame, time.perf_counter())

        future.add_done_callback(note)
        return future

    transport.link.publish = timed
    messages = results(int(rate * seconds), sequence)
    sent: dict[int, float] = {}
    start = time.perf_counter()
    for i, message in enumerate(messages):
        time.sleep(max(0.0, start + i / rate - time.perf_counter()))
        sent[message.frame] = time.perf_counter()
        transport.publish(message)
    wait_delivered(transport, len(messages))
    transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="bench"))
    latencies = np.array([(acked[frame] - at) * 1e3 for frame, at in sent.items()])
    return {"results_per_s": rate, "count": len(latencies), "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)), "max_ms": float(latencies.max())}


def recovery(broker: Mosquitto, device, folder: Path, count: int, sequence: SequenceCounter) -> dict:
    """Spool `count` results while offline, then time a fresh transport delivering them all."""
    config = settings(broker, device, folder, outbox={**UNLIMITED, "max_mb": 1024})
    outbox = open_outbox(config.outbox)
    topic = f"edge/{THING}/inference"
    for message in results(count, sequence):
        outbox.put(topic, 1, message.to_json_bytes())
    outbox.sync()
    outbox.close()
    on_disk = sum(p.stat().st_size for p in folder.glob("outbox.db*"))
    start = time.perf_counter()
    transport = open_transport(config, sequence)
    opened = time.perf_counter() - start
    wait_delivered(transport, count)
    elapsed = time.perf_counter() - start
    transport.close(StatusMessage(**sequence.envelope(), state="offline", agent_version="bench"))
    return {"spooled": count, "outbox_bytes_per_result": on_disk / count, "open_s": opened, "recover_s": elapsed, "results_per_s": count / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=20000)
    parser.add_argument("--spooled", type=int, default=100000)
    parser.add_argument("--latency-s", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pki = Pki.create(folder / "pki")
        device = pki.client(THING)
        with Mosquitto(folder / "broker", pki) as broker:
            sequence = SequenceCounter(THING)
            messages = results(args.results, sequence)
            bare = bare_client_rate(broker, device, [m.to_json_bytes() for m in messages])
            spooled = transport_rate(broker, device, folder / "throughput", messages, sequence)
            figures = {
                "payload_bytes": len(messages[0].to_json_bytes()),
                "throughput": {"bare_awscrt_per_s": bare, "outbox_transport_per_s": spooled["results_per_s"], "ratio": spooled["results_per_s"] / bare, "publish_call_us": spooled["publish_call_us"]},
                "latency_at_30_per_s": latency_at(broker, device, folder / "latency", 30.0, args.latency_s, sequence),
                "recovery": recovery(broker, device, folder / "recovery", args.spooled, sequence),
            }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
