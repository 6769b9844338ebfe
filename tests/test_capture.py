"""Data capture on real parts: the sample video through a real pipeline and TFLite, JPEGs by OpenCV, a spool on
disk, S3 in moto server mode, temporary credentials from the AWS IoT credentials provider stand-in over
mutual TLS (or Greengrass's token exchange service stand-in), and an outage made by cutting a TCP link.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from aws_stand_in import REGION, aws, aws_env, client, moto_server  # noqa: F401 (fixtures)
from broker import STOPPED_CLIENTS, Cable, mosquitto, pki  # noqa: F401 (fixtures)
from bundle_helpers import test_key  # noqa: F401 (fixture)
from conftest import REPO, SAMPLE_VIDEO, agent_env, one_line_error, run_cli
from credentials_provider import ContainerCredentials, IotCredentialsProvider
from iot_service import Execution, IotService
from test_fleet_cli import ROLE, fleet
from test_greengrass_ipc import THING as GG_THING
from test_greengrass_ipc import greengrass  # noqa: F401 (fixture)
from update_helpers import NEW, SERVING

from agent.app import build_pipeline, capturing
from agent.capture.spool import CaptureSpool
from agent.capture.strategies import Strategies, near_threshold
from agent.cloud.jobs import JobRunner
from agent.cloud.credentials import CredentialsRefused, credential_provider
from agent.messages import Box, CaptureImage, CaptureRecord, ModelRef, Prediction, SequenceCounter
from agent.settings import (
    CaptureSettings,
    CredentialSettings,
    MqttSettings,
    Settings,
    SourceSettings,
)
from agent.transport.console import ConsoleTransport
from agent.transport.mqtt import MqttLink
from agent.updates.manager import UpdateManager

THING = "capture-thing"
ALIAS = "edge-capture"
BUCKET = "edge-captures"
MODEL = ModelRef(name="mnist-int8", version=SERVING, sha256="0" * 64)


@pytest.fixture
def provider(pki):
    with IotCredentialsProvider(pki, {ALIAS: 3600}) as running:
        yield running


@pytest.fixture
def device(pki):
    return pki.client(THING)


@pytest.fixture
def bucket(aws):
    client(aws, "s3").create_bucket(Bucket=BUCKET)
    return aws


def iot_credentials(provider, pki, device, thing: str = THING) -> CredentialSettings:
    return CredentialSettings(source="iot", endpoint=provider.endpoint, role_alias=ALIAS, ca=pki.ca.path)


def settings_for(tmp_path: Path, endpoint: str, credentials: CredentialSettings, device, **capture) -> Settings:
    return Settings(
        thing_name=THING,
        source=SourceSettings(spec=str(SAMPLE_VIDEO), loop=True),
        mqtt=MqttSettings(cert=device.cert, key=device.key),
        capture=CaptureSettings(**{
            "enabled": True, "near_threshold": None, "random_rate": 0.25, "spool": tmp_path / "spool", "bucket": BUCKET,
            "region": REGION, "s3_endpoint_url": endpoint, "retry_initial_s": 0.05, "retry_max_s": 0.2, "queue": 64, "min_interval_s": 0,
            "credentials": credentials, **capture,
        }),
    )


def s3_captures(endpoint: str) -> dict[str, list[str]]:
    """capture id -> the S3 keys holding it."""
    keys: dict[str, list[str]] = {}
    for page in client(endpoint, "s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for entry in page.get("Contents", []):
            keys.setdefault(Path(entry["Key"]).name[:36], []).append(entry["Key"])
    return keys


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def record(spool_dir: Path, at: datetime, strategy: str = "random", **fields) -> CaptureRecord:
    capture_id = f"{random.getrandbits(128):032x}"
    capture_id = f"{capture_id[:8]}-{capture_id[8:12]}-{capture_id[12:16]}-{capture_id[16:20]}-{capture_id[20:]}"
    return CaptureRecord(
        capture_id=capture_id, thing_name=THING, captured_at=at, source="test", frame=0, width=8, height=8,
        strategy=strategy, score_threshold=0.5, model=MODEL, predictions=[], images=[CaptureImage(file=f"{capture_id}.jpg")], **fields,
    )


# --- strategies and the spool --------------------------------------------------------------------------


def test_strategies_keep_unsure_predictions_and_a_random_share():
    sure, unsure = Prediction(label="3", class_index=3, score=0.95), Prediction(label="8", class_index=8, score=0.55)
    assert near_threshold([sure, unsure], 0.5, 0.1) and not near_threshold([sure], 0.5, 0.1) and not near_threshold([], 0.5, 0.1)
    strategies = Strategies(CaptureSettings(near_threshold=0.1, random_rate=0.2), random.Random(7))
    assert strategies.choose([unsure], 0.5) == "near_threshold"
    kept = [strategies.choose([sure], 0.5) for _ in range(5000)]
    assert set(kept) == {None, "random"} and 0.17 < kept.count("random") / len(kept) < 0.23
    assert Strategies(CaptureSettings(near_threshold=None, random_rate=0.0)).choose([unsure], 0.5) is None


def test_the_spool_survives_a_restart_and_keeps_its_bounds(tmp_path):
    now = datetime.now(timezone.utc)
    clock = [now.timestamp()]
    spool = CaptureSpool(tmp_path, max_per_day=3, max_bytes=10_000, max_age_s=3600, clock=lambda: clock[0])
    first = spool.add(record(tmp_path, now), [b"x" * 3000])
    second = spool.add(record(tmp_path, now + timedelta(seconds=1)), [b"y" * 3000])
    assert [c.record.capture_id for c in spool.waiting()] == [first.record.capture_id, second.record.capture_id]
    (tmp_path / ".half-written.jpg.tmp").write_bytes(b"crash")
    stray = tmp_path / "00000000-0000-0000-0000-000000000000.jpg"
    stray.write_bytes(b"no record")
    clock[0] += 120  # the stray image is older than a crash's leftovers can be fresh

    again = CaptureSpool(tmp_path, max_per_day=3, max_bytes=10_000, max_age_s=3600, clock=lambda: clock[0])
    assert [c.record.capture_id for c in again.waiting()] == [first.record.capture_id, second.record.capture_id]
    assert not stray.exists() and not list(tmp_path.glob(".*.tmp"))
    assert again.stats.waiting == 2 and again.stats.waiting_bytes == second.size * 2

    third = again.add(record(tmp_path, now + timedelta(seconds=2)), [b"z" * 5000])  # over 10 000 bytes: the oldest goes
    assert third is not None and again.stats.dropped["spool_full"] == 1
    assert [c.record.capture_id for c in again.waiting()] == [second.record.capture_id, third.record.capture_id]
    assert again.add(record(tmp_path, now), [b"w"]) is None and again.stats.dropped["daily_limit"] == 1  # 3 a day, counted across the restart

    clock[0] += 3600
    assert again.waiting() == [] and again.stats.dropped["too_old"] == 2 and again.stats.waiting == 0


def test_frames_in_a_row_are_kept_once_per_interval_and_crops_cut_the_boxes(tmp_path):
    from agent.capture.capturer import Capturer
    from agent.messages import InferenceResult, StageLatency
    from agent.sources import Frame

    spool = CaptureSpool(tmp_path, max_per_day=100, max_bytes=10**8, max_age_s=3600)
    settings = CaptureSettings(enabled=True, near_threshold=0.1, min_interval_s=3600, crops=True)
    capturer = Capturer(settings, THING, spool, lambda: MODEL, lambda: 0.5).start()
    image = np.full((120, 160), 200, np.uint8)
    unsure = [Prediction(label="7", class_index=7, score=0.55, box=Box(x=10, y=20, w=30, h=40)), Prediction(label="1", class_index=1, score=0.9, box=Box(x=80, y=20, w=20, h=40))]
    for index in range(5):
        frame = Frame(image=image, index=index, captured_at=datetime.now(timezone.utc), source="test")
        result = InferenceResult(**SequenceCounter(THING).envelope(), source="test", frame=index, captured_at=frame.captured_at, model=MODEL, task="mnist-digits", predictions=unsure, latency=StageLatency(find_ms=0, classify_ms=0, total_ms=0))
        capturer.on_frame(frame, result, 1.0)
    capturer.close()
    [kept] = spool.waiting()
    assert (kept.record.frame, kept.record.strategy, spool.stats.kept["near_threshold"]) == (0, "near_threshold", 1)
    assert [image.box for image in kept.record.images] == [p.box for p in unsure]
    assert [cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape for path in kept.images] == [(40, 30), (40, 20)]


# --- credentials ---------------------------------------------------------------------------------------------


def test_the_iot_credentials_provider_is_asked_over_mutual_tls_for_the_role_alias_and_thing(provider, pki, device):
    settings = iot_credentials(provider, pki, device)
    credentials = credential_provider(settings, MqttSettings(cert=device.cert, key=device.key), THING).load()
    frozen = credentials.get_frozen_credentials()
    assert frozen.access_key.startswith("ASIA") and frozen.token and credentials.method == "iot-credentials-provider"
    [asked] = provider.requests
    assert (asked.path, asked.thing_header, asked.certificate_thing, asked.status) == (f"/role-aliases/{ALIAS}/credentials", THING, THING, 200)


def test_the_credentials_provider_refuses_another_things_name_and_an_unknown_alias(provider, pki, device):
    mqtt = MqttSettings(cert=device.cert, key=device.key)
    with pytest.raises(CredentialsRefused, match="HTTP 403 Access Denied"):
        credential_provider(iot_credentials(provider, pki, device), mqtt, "someone-else").load()
    with pytest.raises(CredentialsRefused, match="HTTP 404"):
        credential_provider(iot_credentials(provider, pki, device).model_copy(update={"role_alias": "nope"}), mqtt, THING).load()
    rogue = pki.rogue.issue(THING)  # a certificate the provider does not trust: no TLS handshake at all
    with pytest.raises(CredentialsRefused, match="unreachable"):
        credential_provider(iot_credentials(provider, pki, device), MqttSettings(cert=rogue.cert, key=rogue.key), THING).load()
    assert [r.status for r in provider.requests] == [403, 404]


def test_missing_credential_settings_are_one_clear_line(tmp_path):
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"capture": {"enabled": True, "bucket": BUCKET, "spool": str(tmp_path / "spool")}}))
    line = one_line_error(run_cli("run", "--config", config, "--max-frames", "1", env=agent_env()))
    assert "capture.credentials.endpoint" in line and "capture.credentials.role_alias" in line and "mqtt.cert" in line


# --- capture to S3 -------------------------------------------------------------------------------------------


def test_kept_frames_reach_s3_under_the_things_prefix_with_their_records(tmp_path, bucket, provider, pki, device):
    settings = settings_for(tmp_path, bucket, iot_credentials(provider, pki, device), device)
    pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter(THING))
    with capturing(pipeline, settings) as spool:
        pipeline.run(max_frames=80)
        wait_until(lambda: spool.stats.kept.total() > 0 and spool.stats.waiting == 0 and not spool.stats.dropped)

    stored = s3_captures(bucket)
    assert len(stored) == spool.stats.kept["random"] == spool.stats.uploaded > 5
    s3 = client(bucket, "s3")
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    for capture_id, keys in stored.items():
        prefix = f"captures/{THING}/{today}/mnist-int8-{SERVING}/"
        assert sorted(keys) == [f"{prefix}{capture_id}.jpg", f"{prefix}{capture_id}.json"]
        body = s3.get_object(Bucket=BUCKET, Key=f"{prefix}{capture_id}.json")
        saved = CaptureRecord.model_validate_json(body["Body"].read())
        assert (saved.thing_name, saved.strategy, saved.model.name, saved.width, saved.height) == (THING, "random", "mnist-int8", 640, 480)
        image = s3.get_object(Bucket=BUCKET, Key=f"{prefix}{capture_id}.jpg")
        assert image["ContentType"] == "image/jpeg"
        decoded = cv2.imdecode(np.frombuffer(image["Body"].read(), np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded.shape[:2] == (480, 640)
    assert sorted(path.name for path in (tmp_path / "spool").iterdir()) == [".counts.json"]  # all sent, nothing left
    assert {r.certificate_thing for r in provider.requests} == {THING} and provider.requests[0].thing_header == THING


def test_an_outage_and_a_restart_lose_and_duplicate_nothing(tmp_path, bucket, provider, pki, device):
    link = Cable(SimpleNamespace(port=int(bucket.rsplit(":", 1)[1]))).restore()
    endpoint = f"http://127.0.0.1:{link.port}"
    settings = settings_for(tmp_path, endpoint, iot_credentials(provider, pki, device), device, random_rate=0.5)
    pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter(THING))
    with capturing(pipeline, settings) as spool:
        pipeline.run(max_frames=20)
        wait_until(lambda: spool.stats.uploaded >= 3)
        link.cut()  # S3 goes away mid-stream
        pipeline.run(max_frames=80)
        wait_until(lambda: spool.stats.upload_failures >= 2)
        waiting_in_outage = spool.stats.waiting
        assert waiting_in_outage > 0
    kept_first_run = spool.stats.kept["random"]
    uploaded_first_run = spool.stats.uploaded
    assert uploaded_first_run + spool.stats.waiting == kept_first_run  # the agent stopped with captures still waiting

    link.restore()  # the network is back, and the agent starts again on the same spool
    pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter(THING))
    with capturing(pipeline, settings) as resumed:
        assert resumed.stats.waiting == spool.stats.waiting
        wait_until(lambda: resumed.stats.waiting == 0)
    stored = s3_captures(bucket)
    assert len(stored) == kept_first_run == uploaded_first_run + resumed.stats.uploaded  # nothing lost, nothing sent twice
    assert all(len(keys) == 2 for keys in stored.values())
    link.cut()



def test_greengrass_uploads_with_the_token_exchange_services_credentials(greengrass, tmp_path, bucket):
    with ContainerCredentials() as tes:
        # What the nucleus gives a component that depends on aws.greengrass.TokenExchangeService.
        greengrass.nucleus.environment.update({"AWS_CONTAINER_CREDENTIALS_FULL_URI": tes.uri, "AWS_CONTAINER_AUTHORIZATION_TOKEN": tes.token})
        capture = {"enabled": True, "near_threshold": None, "random_rate": 0.3, "min_interval_s": 0, "spool": str(tmp_path / "gg-spool"), "bucket": BUCKET, "region": REGION, "s3_endpoint_url": bucket}
        component = greengrass({"source": {"spec": str(SAMPLE_VIDEO), "loop": True, "pace_fps": 30}, "capture": capture})
        wait_until(lambda: len(s3_captures(bucket)) >= 5 or component.process.poll() is not None, timeout_s=60)
        code, stderr = component.stop()
        assert code == 0, stderr
    stored = s3_captures(bucket)
    records = [keys for keys in stored.values() if any(key.endswith(".json") for key in keys)]
    assert len(records) >= 4 and all(len(keys) == 2 for keys in records)  # a record goes up after its image
    assert all(key.startswith(f"captures/{GG_THING}/") for keys in stored.values() for key in keys)
    assert tes.requests and {r.authorization for r in tes.requests} == {tes.token} and {r.status for r in tes.requests} == {200}


@pytest.fixture
def jobs(mosquitto, pki):
    with IotService(mosquitto, pki) as running:
        yield running


def run_job(jobs: IotService, s3, iot, published: subprocess.CompletedProcess, url: str | None = None) -> tuple[dict, Execution]:
    """What IoT Core does with a job `edge-fleet` created: the device gets its document over IoT Jobs, with
    the presigned URL of the uploaded bundle filled in (or `url`). The document and the device's final execution."""
    assert published.returncode == 0, published.stderr
    job = json.loads(published.stdout)
    document = json.loads(iot.get_job_document(jobId=job["job_id"])["document"])
    url = url or s3.generate_presigned_url("get_object", Params={"Bucket": "edge-models", "Key": job["s3"].split("/", 3)[3]}, ExpiresIn=600)
    jobs.queue_job(THING, job["job_id"], {**document, "url": url})
    wait_until(lambda: jobs.execution(THING, job["job_id"]).status not in ("QUEUED", "IN_PROGRESS"), timeout_s=120)
    return document, jobs.execution(THING, job["job_id"])


@pytest.mark.timeout(900)
def test_the_retraining_loop_capture_pull_fine_tune_publish_in_shadow_promote(tmp_path, bucket, provider, pki, device, mosquitto, jobs, test_key):
    """Capture on a device -> `edge-fleet data pull` -> fine-tune with the training program on the pulled
    folder (a short run) -> `model publish --shadow` over IoT Jobs -> the device evaluates the candidate ->
    `model promote` -> the device serves the fine-tuned model from its store."""
    s3, iot = client(bucket, "s3"), client(bucket, "iot")
    s3.create_bucket(Bucket="edge-models")
    iot.create_thing(thingName=THING)
    settings = settings_for(tmp_path, bucket, iot_credentials(provider, pki, device), device, random_rate=0.3)
    settings = settings.model_copy(update={
        "source": SourceSettings(spec=str(SAMPLE_VIDEO), loop=True, pace_fps=30),
        "model": settings.model.model_copy(update={"trusted_keys": [*settings.model.trusted_keys, test_key[1]]}),
        "updates": settings.updates.model_copy(update={"store": tmp_path / "store", "health_frames": 5, "download": settings.updates.download.model_copy(update={"allow_http": True})}),
    })
    pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter(THING))
    manager = UpdateManager.serving(settings, pipeline)
    link = MqttLink(MqttSettings(endpoint="127.0.0.1", port=mosquitto.port, cert=device.cert, key=device.key, ca=pki.ca.path, flow_control="none"), client_id=THING)
    link.connect(timeout_s=10)
    runner = JobRunner(link.client, THING, manager, timeout_s=10)
    with capturing(pipeline, settings) as spool:
        serving = threading.Thread(target=pipeline.run, daemon=True)
        serving.start()
        runner.start()
        try:
            # 1. The device captures and uploads.
            wait_until(lambda: spool.stats.uploaded >= 8)

            # 2. The operator pulls a dataset (and would review labels.csv: here the proposals stand).
            out = tmp_path / "dataset"
            today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
            pulled = fleet(bucket, "data", "pull", "--thing", THING, "--since", today, "--out", out, "--bucket", BUCKET)
            assert pulled.returncode == 0, pulled.stderr
            summary = json.loads(pulled.stdout)
            assert summary["downloaded"] >= 8 and len(list((out / "records").glob("*.json"))) == summary["captures"]
            with open(out / "labels.csv", newline="") as stream:
                rows = [row for row in csv.DictReader(stream) if row["x"]]
            assert rows and all(row["label"] == row["proposed"] for row in rows)

            # 3. Fine-tune: the training program on the pulled folder, signed with the fleet's key; a short run
            #    (10 000 MNIST digits, one epoch: about 30 s on 2 cores; still about 96% accurate).
            trained = tmp_path / "fine-tuned"
            command = [sys.executable, "-m", "models.mnist.train", "--dataset", str(out), "--epochs", "1", "--train-images", "10000", "--batch-size", "32",
                       "--calibration-images", "200", "--version", NEW, "--out", str(trained), "--key", str(test_key[0])]
            training = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=agent_env())
            assert training.returncode == 0, training.stderr[-3000:]
            assert f"dataset {out}: {len(rows)} labelled digits" in training.stdout, training.stdout
            manifest = json.loads((trained / "manifest.json").read_text())
            assert (manifest["name"], manifest["version"]) == ("mnist-int8", NEW) and (trained / "manifest.sig").is_file()

            # 4. Publish it in shadow: the device fetches, verifies and evaluates it beside the serving model.
            published = fleet(bucket, "model", "publish", trained, "--thing", THING, "--bucket", "edge-models", "--signing-key", test_key[0], "--presign-role-arn", ROLE, "--shadow", "--shadow-frames", "15")
            document, evaluated = run_job(jobs, s3, iot, published)
            assert (document["mode"], document["shadow"]) == ("shadow", {"frames": 15})
            assert evaluated.status == "SUCCEEDED", evaluated.status_details
            details = evaluated.status_details
            assert (details["candidate"], details["frames"], details["promoted"]) == (NEW, "15", "false")
            assert float(details["agreement"]) >= 0.8, details  # it reads this camera's digits as the serving model does
            assert pipeline.slot.active.ref.version == SERVING

            # 5. Promote: the device serves the fine-tuned model it verified and stored; the URL is never fetched again.
            promoted = fleet(bucket, "model", "promote", "--thing", THING, "--version", NEW, "--bucket", "edge-models", "--presign-role-arn", ROLE)
            serve, outcome = run_job(jobs, s3, iot, promoted, url="https://127.0.0.1:9/never-fetched.zip")
            assert serve["mode"] == "serve" and serve["sha256"] == document["sha256"]
            assert outcome.status == "SUCCEEDED", outcome.status_details
            active = pipeline.slot.active
            assert (active.ref.version, manager.store.state().active.version) == (NEW, NEW)
            assert active.manifest.files["model.tflite"] == manifest["files"]["model.tflite"]  # the fine-tuned weights
        finally:
            runner.close()
            pipeline.stop()
            serving.join(10)
            gc.collect()  # the SDK's native clients go before the link below them
            STOPPED_CLIENTS.append(link.client)
            link.close()


def test_the_upload_role_may_put_only_under_its_own_things_prefix():
    """The key prefix the uploader writes under is the one deploy/iot/capture-role-policy.json allows."""
    policy = json.loads((Path(__file__).resolve().parent.parent / "deploy" / "iot" / "capture-role-policy.json").read_text())
    [statement] = policy["Statement"]
    assert (statement["Effect"], statement["Action"]) == ("Allow", "s3:PutObject")
    assert statement["Resource"] == "arn:aws:s3:::CAPTURE_BUCKET/captures/${credentials-iot:ThingName}/*"
    kept = record(Path("."), datetime(2026, 12, 2, tzinfo=timezone.utc))
    assert kept.key_prefix().startswith(f"captures/{THING}/2026-12-02/")
