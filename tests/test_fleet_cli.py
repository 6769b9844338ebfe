"""`edge-fleet` against an AWS stand-in: moto in server mode for the IoT control plane, S3 and iot-data
shadows, the real CLI as a process. Greengrass v2 (which moto lacks) and fleet indexing (moto's SearchIndex
has no paging, no classic shadow and fakes connectivity; it lacks GetStatistics and GetBucketsAggregation)
are checked as recorded request/response shapes with botocore's Stubber.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import sysconfig
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
from aws_stand_in import REGION, aws, aws_env, client, moto_server, set_job_execution  # noqa: F401 (fixtures)
from botocore.stub import ANY, Stubber
from bundle_helpers import make_bundle, other_key, test_key  # noqa: F401 (fixtures)
from conftest import REPO, agent_env, one_line_error, run_cli

from agent.bundles.bundle import open_bundle, sha256_file
from agent.bundles.document import document_signed_bytes, parse_update
from agent.bundles.signing import key_id, load_public_key, verify
from agent.settings import DEV_SIGNING_KEYS, SHIPPED_BUNDLE, load_settings

ROLE = "arn:aws:iam::123456789012:role/edge-presign"


def fleet(endpoint: str, *args) -> subprocess.CompletedProcess:
    return run_cli(*args, "--endpoint-url", endpoint, env=agent_env(), program="agent.fleet")


def fleet_error(result: subprocess.CompletedProcess) -> str:
    return one_line_error(result, program="edge-fleet")


@pytest.fixture
def bucket(aws) -> str:
    client(aws, "s3").create_bucket(Bucket="edge-models")
    return "edge-models"


@pytest.fixture
def unsigned_bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle", None)


# --- provision -----------------------------------------------------------------------------------------


def test_provision_registers_the_thing_and_writes_a_safe_device_folder(aws, tmp_path, test_key):
    out = tmp_path / "device-1"
    result = fleet(aws, "provision", "device-1", "--group", "line-a", "--out", out, "--trusted-key", test_key[1])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)

    iot = client(aws, "iot")
    assert iot.list_things_in_thing_group(thingGroupName="line-a")["things"] == ["device-1"]
    [principal] = iot.list_thing_principals(thingName="device-1")["principals"]
    assert iot.list_attached_policies(target=principal)["policies"][0]["policyName"] == "edge-agent"
    policy = iot.get_policy(policyName="edge-agent")["policyDocument"]
    assert "REGION" not in policy and "ACCOUNT_ID" not in policy and f"arn:aws:iot:{REGION}:123456789012:client/" in policy
    certificate = iot.describe_certificate(certificateId=summary["certificate_id"])["certificateDescription"]
    assert certificate["status"] == "ACTIVE"

    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "private.pem.key").stat().st_mode) == 0o600
    assert (out / "private.pem.key").read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert (out / "device.pem.crt").read_text() == certificate["certificatePem"]
    settings = load_settings(out / "agent.yaml")
    assert (settings.thing_name, settings.transport, settings.mqtt.endpoint) == ("device-1", "mqtt", summary["endpoint"])
    assert summary["endpoint"].endswith(f"-ats.iot.{REGION}.amazonaws.com")
    assert settings.mqtt.cert == (out / "device.pem.crt").resolve() and settings.mqtt.key == (out / "private.pem.key").resolve()
    assert settings.mqtt.ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert [path.name for path in settings.model.trusted_keys] == [test_key[1].name]

    # A second device joins the same group and shares the one policy.
    again = fleet(aws, "provision", "device-2", "--group", "line-a", "--out", tmp_path / "device-2")
    assert again.returncode == 0, again.stderr
    assert sorted(iot.list_things_in_thing_group(thingGroupName="line-a")["things"]) == ["device-1", "device-2"]
    assert len(iot.list_policies()["policies"]) == 1


def test_provision_dry_run_prints_the_requests_and_changes_nothing(aws, tmp_path):
    out = tmp_path / "device-1"
    result = fleet(aws, "provision", "device-1", "--group", "line-a", "--out", out, "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    operations = [request["operation"] for request in plan["requests"]]
    assert operations == ["CreateThing", "CreateThingGroup", "AddThingToThingGroup", "CreatePolicy", "CreateKeysAndCertificate", "AttachPolicy", "AttachThingPrincipal"]
    assert plan["requests"][0]["params"] == {"thingName": "device-1"}
    assert plan["requests"][5]["params"] == {"policyName": "edge-agent", "target": "<certificateArn>"}
    assert client(aws, "iot").list_things()["things"] == []
    assert not out.exists()


def test_provision_never_overwrites_credentials(aws, tmp_path):
    out = tmp_path / "device-1"
    assert fleet(aws, "provision", "device-1", "--out", out).returncode == 0
    key = (out / "private.pem.key").read_bytes()
    line = fleet_error(fleet(aws, "provision", "device-1", "--out", out))
    assert "already exists" in line and "--out" in line
    assert (out / "private.pem.key").read_bytes() == key


def test_provision_refuses_a_thing_name_iot_would_refuse(aws, tmp_path):
    line = fleet_error(fleet(aws, "provision", "bad/name", "--out", tmp_path / "x"))
    assert "thing_name" in line


# --- publish, rollback, cancel via IoT Jobs ------------------------------------------------------------------


def publish(aws, bundle, bucket, key, *extra) -> subprocess.CompletedProcess:
    return fleet(aws, "model", "publish", bundle, "--bucket", bucket, "--signing-key", key, "--presign-role-arn", ROLE, *extra)


def test_publish_signs_uploads_content_addressed_and_creates_a_paced_job(aws, tmp_path, bucket, unsigned_bundle, test_key):
    assert fleet(aws, "provision", "device-1", "--group", "line-a", "--out", tmp_path / "d1").returncode == 0
    result = publish(aws, unsigned_bundle, bucket, test_key[0], "--group", "line-a", "--base-rate-per-minute", "5", "--abort-threshold-percent", "20", "--timeout-minutes", "30")
    assert result.returncode == 0, result.stderr
    assert f"s3://{bucket}/models/mnist-int8/" in result.stderr  # the progress bar
    published = json.loads(result.stdout)

    # The uploaded zip: content-addressed, signed by the operator's key, the bundle left unsigned.
    s3 = client(aws, "s3")
    key = f"models/mnist-int8/{published['sha256']}/bundle.zip"
    downloaded = tmp_path / "downloaded.zip"
    s3.download_file(bucket, key, str(downloaded))
    assert sha256_file(downloaded) == published["sha256"]
    assert open_bundle(downloaded, trusted_keys=[test_key[1]]).signer is not None
    assert not (unsigned_bundle / "manifest.sig").exists()

    # The job: the update document as devices parse it, presigned URL placeholder, rollout/abort/timeout.
    job = client(aws, "iot").describe_job(jobId=published["job_id"])["job"]
    raw = json.loads(client(aws, "iot").get_job_document(jobId=published["job_id"])["document"])
    jsonschema.validate(raw, json.loads((REPO / "deploy" / "jobs" / "model-update.schema.json").read_text()))
    document = parse_update(raw)
    assert (document.name, document.version, document.sha256, document.size) == ("mnist-int8", "1.2.0", published["sha256"], downloaded.stat().st_size)
    assert document.url == f"${{aws:iot:s3-presigned-url-v2:https://s3.{REGION}.amazonaws.com/{bucket}/{key}}}"
    signed = document_signed_bytes(document.name, document.version, document.sha256, document.size)
    assert verify(signed, document.signature.model_dump_json().encode(), [test_key[1]], "job") == document.signature.key_id
    assert not document.allow_downgrade
    assert job["targets"] == [client(aws, "iot").describe_thing_group(thingGroupName="line-a")["thingGroupArn"]]
    assert job["presignedUrlConfig"] == {"roleArn": ROLE, "expiresInSec": 3600}
    assert job["jobExecutionsRolloutConfig"]["exponentialRate"]["baseRatePerMinute"] == 5
    assert job["abortConfig"]["criteriaList"][0] == {"failureType": "ALL", "action": "CANCEL", "thresholdPercentage": 20.0, "minNumberOfExecutedThings": 10}
    assert job["timeoutConfig"] == {"inProgressTimeoutInMinutes": 30}

    # Publishing the same bytes again uploads nothing (same key) but makes a new job.
    again = publish(aws, downloaded, bucket, test_key[0], "--thing", "device-1")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["sha256"] == published["sha256"] and "s3://" not in again.stderr
    assert [obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket)["Contents"]] == [key, "models/mnist-int8/versions/1.2.0.json"]


def test_publish_dry_run_uploads_nothing(aws, tmp_path, bucket, unsigned_bundle, test_key):
    assert fleet(aws, "provision", "device-1", "--out", tmp_path / "d1").returncode == 0
    result = publish(aws, unsigned_bundle, bucket, test_key[0], "--thing", "device-1", "--dry-run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert [request["operation"] for request in plan["requests"]] == ["PutObject", "PutObject", "CreateJob"]
    assert json.loads(plan["requests"][1]["params"]["Body"])["version"] == "1.2.0"  # the release record, as text
    create_job = plan["requests"][2]["params"]
    assert json.loads(create_job["document"])["operation"] == "model-update"
    assert create_job["targets"] == [client(aws, "iot").describe_thing(thingName="device-1")["thingArn"]]
    assert "Contents" not in client(aws, "s3").list_objects_v2(Bucket=bucket)
    assert client(aws, "iot").list_jobs()["jobs"] == []


def test_rollback_points_a_new_job_at_the_earlier_artifact(aws, tmp_path, bucket, unsigned_bundle, test_key):
    assert fleet(aws, "provision", "device-1", "--group", "line-a", "--out", tmp_path / "d1").returncode == 0
    first = json.loads(publish(aws, unsigned_bundle, bucket, test_key[0], "--group", "line-a").stdout)
    newer = make_bundle(tmp_path / "newer", None, lambda raw: raw.update(version="1.3.0"))
    second = json.loads(publish(aws, newer, bucket, test_key[0], "--group", "line-a").stdout)
    assert second["sha256"] != first["sha256"]

    result = fleet(aws, "model", "rollback", "--group", "line-a", "--to", "1.2.0", "--bucket", bucket, "--presign-role-arn", ROLE)
    assert result.returncode == 0, result.stderr
    rollback = json.loads(result.stdout)
    document = parse_update(json.loads(client(aws, "iot").get_job_document(jobId=rollback["job_id"])["document"]))
    assert (document.version, document.sha256, document.allow_downgrade) == ("1.2.0", first["sha256"], True)
    assert document.signature == parse_update(first["document"]).signature

    line = fleet_error(fleet(aws, "model", "rollback", "--group", "line-a", "--to", "0.9.0", "--bucket", bucket, "--presign-role-arn", ROLE))
    assert "version 0.9.0 was never published" in line


def test_trust_chain_from_a_new_fleet_key_to_a_rollback_to_the_starting_model(aws, tmp_path, bucket):
    """keygen -> provision --trusted-key -> the device starts on the model it shipped with -> publish shipped (its
    1.2.0 released under the fleet key) -> publish 1.3.0 -> rollback --to 1.2.0, which the device's keys accept."""
    key = tmp_path / "keys" / "fleet.key"
    assert run_cli("model", "keygen", "--key", key, program="agent.fleet").returncode == 0
    provisioned = fleet(aws, "provision", "device-1", "--group", "line-a", "--out", tmp_path / "device", "--trusted-key", key.with_suffix(".pub"))
    assert provisioned.returncode == 0, provisioned.stderr
    settings = load_settings(tmp_path / "device" / "agent.yaml")
    assert [path.name for path in settings.model.trusted_keys] == ["fleet.pub"]  # the device trusts the fleet key only

    # The device starts (from another directory) on the shipped model, signed by a development key.
    (tmp_path / "elsewhere").mkdir()
    started = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", tmp_path / "device" / "agent.yaml", "--transport", "console", "--max-frames", "10"],
        capture_output=True, text=True, timeout=120, env=agent_env(), cwd=tmp_path / "elsewhere",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert {json.loads(line)["model"]["version"] for line in started.stdout.splitlines()} == {"1.2.0"}

    starting = publish(aws, "shipped", bucket, key, "--group", "line-a")
    assert starting.returncode == 0, starting.stderr
    starting = json.loads(starting.stdout)
    newer = make_bundle(tmp_path / "newer", None, lambda raw: raw.update(version="1.3.0"))
    assert publish(aws, newer, bucket, key, "--group", "line-a").returncode == 0

    result = fleet(aws, "model", "rollback", "--group", "line-a", "--to", "1.2.0", "--bucket", bucket, "--presign-role-arn", ROLE)
    assert result.returncode == 0, result.stderr
    document = parse_update(json.loads(client(aws, "iot").get_job_document(jobId=json.loads(result.stdout)["job_id"])["document"]))
    assert (document.version, document.sha256, document.allow_downgrade) == ("1.2.0", starting["sha256"], True)
    # What the device checks before it installs it (agent/bundles/updates.py), with its own trusted keys.
    signed = document_signed_bytes(document.name, document.version, document.sha256, document.size)
    fleet_key = verify(signed, document.signature.model_dump_json().encode(), settings.model.trusted_keys, "job document")
    artifact = tmp_path / "rollback.zip"
    client(aws, "s3").download_file(bucket, starting["s3"].split("/", 3)[3], str(artifact))
    assert sha256_file(artifact) == document.sha256
    bundle = open_bundle(artifact, trusted_keys=settings.model.trusted_keys)
    assert (bundle.manifest.version, bundle.signer) == ("1.2.0", fleet_key)
    assert bundle.manifest.files == open_bundle(SHIPPED_BUNDLE, trusted_keys=DEV_SIGNING_KEYS).manifest.files  # the shipped model, re-signed


def test_job_cancel(aws, tmp_path, bucket, unsigned_bundle, test_key):
    assert fleet(aws, "provision", "device-1", "--out", tmp_path / "d1").returncode == 0
    job = json.loads(publish(aws, unsigned_bundle, bucket, test_key[0], "--thing", "device-1").stdout)["job_id"]
    dry = fleet(aws, "job", "cancel", job, "--dry-run")
    assert json.loads(dry.stdout)["requests"] == [{"service": "iot", "operation": "CancelJob", "params": {"jobId": job, "reasonCode": "OPERATOR_CANCELED", "comment": "canceled by edge-fleet", "force": False}}]
    assert client(aws, "iot").describe_job(jobId=job)["job"]["status"] != "CANCELED"
    result = fleet(aws, "job", "cancel", job)
    assert result.returncode == 0, result.stderr
    assert client(aws, "iot").describe_job(jobId=job)["job"]["status"] == "CANCELED"


# --- fleet status ------------------------------------------------------------------------------------------


def _fleet_of_three(aws, tmp_path) -> str:
    """device-1..3 in line-a, each reporting a model version, each with an execution of one job."""
    for n in (1, 2, 3):
        assert fleet(aws, "provision", f"device-{n}", "--group", "line-a", "--out", tmp_path / f"d{n}").returncode == 0
    data = client(aws, "iot-data")
    for n, version in ((1, "1.0.0"), (2, "1.0.0"), (3, "0.9.0")):
        data.update_thing_shadow(thingName=f"device-{n}", payload=json.dumps({"state": {"reported": {"model": {"name": "mnist-int8", "version": version}}}}))
    # One execution per device (moto gives a group target a single execution for the group).
    iot = client(aws, "iot")
    arns = [iot.describe_thing(thingName=f"device-{n}")["thingArn"] for n in (1, 2, 3)]
    iot.create_job(jobId="update-1", targets=arns, document=json.dumps({"operation": "model-update"}))
    return "update-1"


def test_fleet_status_table_counts_versions_and_fails_on_a_failed_device(aws, tmp_path):
    job = _fleet_of_three(aws, tmp_path)
    set_job_execution(job, "device-1", "SUCCEEDED", {"version": "1.0.0"})
    set_job_execution(job, "device-2", "SUCCEEDED", {"version": "1.0.0"})
    ok = fleet(aws, "fleet", "status", "--group", "line-a", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["versions"] == {"0.9.0": 1, "1.0.0": 2}
    assert report["source"] == "per-device"  # moto starts with fleet indexing off
    assert [(d["thing"], d["model_version"], d["job_status"]) for d in report["devices"]] == [
        ("device-1", "1.0.0", "SUCCEEDED"),
        ("device-2", "1.0.0", "SUCCEEDED"),
        ("device-3", "0.9.0", "QUEUED"),
    ]
    assert all(d["last_seen"] and d["last_seen"].endswith("Z") for d in report["devices"])

    set_job_execution(job, "device-3", "FAILED", {"reason": "SHA256_MISMATCH", "message": "download does not match its sha256"})
    failed = fleet(aws, "fleet", "status", "--group", "line-a")
    assert failed.returncode == 1, failed.stderr
    lines = failed.stdout.splitlines()
    assert lines[0].split() == ["THING", "MODEL", "JOB", "STATUS", "SHADOW", "LAST", "SEEN", "REASON"]
    assert "FAILED" in lines[3] and "SHA256_MISMATCH download does not match its sha256" in lines[3]
    assert lines[-1] == "3 devices; models 0.9.0: 1, 1.0.0: 2; failed: 1"


def test_fleet_status_watch_shows_the_rollouts_progress_until_it_settles(aws, tmp_path):
    job = _fleet_of_three(aws, tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.fleet", "fleet", "status", "--group", "line-a", "--watch", "--interval", "0.2", "--endpoint-url", aws],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, env=agent_env(), cwd=REPO,
    )
    try:
        first = process.stdout.read(1)  # unbuffered: the bar is drawn, so the rollout had not settled yet
        set_job_execution(job, "device-1", "SUCCEEDED")
        set_job_execution(job, "device-2", "SUCCEEDED")
        set_job_execution(job, "device-3", "FAILED", {"reason": "SHA256_MISMATCH", "message": "download does not match its sha256"})
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    output = (first + rest).decode()
    assert process.returncode == 1, output  # a device failed
    frames = output.replace("\r", "\n").splitlines()
    bars = [frame for frame in frames if frame.startswith(f"rollout {job}")]
    assert "0/3" in bars[0] and "queued 3" in bars[0]
    assert "3/3" in bars[-1] and "succeeded 2 failed 1" in bars[-1] and "models 0.9.0: 1, 1.0.0: 2" in bars[-1]
    assert frames[-2:] == ["device-3: FAILED SHA256_MISMATCH download does not match its sha256", "3 devices; models 0.9.0: 1, 1.0.0: 2; failed: 1"]


def test_one_device_is_counted_as_one_device(aws, tmp_path):
    assert fleet(aws, "provision", "device-1", "--group", "line-a", "--out", tmp_path / "d1").returncode == 0
    result = fleet(aws, "fleet", "status", "--group", "line-a")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "1 device; models unknown: 1; failed: 0"


# --- where requests go: AWS_REGION, AWS_ENDPOINT_URL ----------------------------------------------------------


def test_aws_region_is_honoured_before_aws_default_region(aws, tmp_path, monkeypatch):
    """The runbook and --help tell operators to set AWS_REGION; it wins over AWS_DEFAULT_REGION, as in the AWS CLI."""
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    result = fleet(aws, "provision", "device-1", "--out", tmp_path / "d1")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["endpoint"].endswith("-ats.iot.eu-west-1.amazonaws.com")
    assert "arn:aws:iot:eu-west-1:123456789012:client/" in client(aws, "iot", "eu-west-1").get_policy(policyName="edge-agent")["policyDocument"]


def test_aws_endpoint_url_reaches_every_call_including_the_shadow_reads(aws, tmp_path, monkeypatch):
    """No --endpoint-url: AWS's own AWS_ENDPOINT_URL sends IoT, S3 and iot-data (the shadows) to the stand-in."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws)
    provisioned = run_cli("provision", "device-1", "--group", "line-a", "--out", tmp_path / "d1", env=agent_env(), program="agent.fleet")
    assert provisioned.returncode == 0, provisioned.stderr
    reported = {"state": {"reported": {"model": {"name": "mnist-int8", "version": "1.0.0"}}}}
    client(aws, "iot-data").update_thing_shadow(thingName="device-1", payload=json.dumps(reported))
    result = run_cli("fleet", "status", "--group", "line-a", "--json", env=agent_env(), program="agent.fleet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["devices"][0]["model_version"] == "1.0.0"  # read from the shadow, at the stand-in


# --- errors: one line, exit 2 ------------------------------------------------------------------------------


@pytest.fixture
def web_server(tmp_path):
    """A plain web server (not AWS): 404 pages for GET, 501 pages for POST, both HTML."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("command", [("fleet", "status"), ("provision", "device-1", "--out", "unused")])
def test_an_endpoint_that_is_not_aws_is_one_line_without_its_page(aws_env, web_server, command):
    line = fleet_error(run_cli(*command, "--endpoint-url", web_server, env=agent_env(), program="agent.fleet"))
    assert web_server in line and ("does not answer as AWS does" in line or "not an AWS reply" in line)
    assert "<" not in line and "html" not in line.lower()


def test_without_the_fleet_extra_the_operator_is_told_how_to_install_it(tmp_path):
    """Python packages as a device has them: everything but boto3, botocore and s3transfer (the `fleet` extra)."""
    packages = tmp_path / "site-packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("boto3", "botocore", "s3transfer", "__editable__", "_edge_agent")) and entry.suffix != ".pth":
            (packages / entry.name).symlink_to(entry)
    env = {**agent_env(), "PYTHONPATH": f"{packages}{os.pathsep}{REPO}"}
    line = fleet_error(subprocess.run([sys.executable, "-S", "-m", "agent.fleet", "fleet", "status"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path))
    assert line == "edge-fleet: boto3 is not installed; install the operator tools with `pip install 'edge-agent[fleet]'`"
    keygen = subprocess.run([sys.executable, "-S", "-m", "agent.fleet", "model", "keygen", "--key", tmp_path / "k.key"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr  # what needs no AWS works without the extra




def test_no_credentials_is_one_line(aws, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    line = fleet_error(fleet(aws, "fleet", "status"))
    assert "no AWS credentials" in line and "aws configure" in line


def test_missing_bucket_is_one_line(aws, tmp_path, unsigned_bundle, test_key):
    assert fleet(aws, "provision", "device-1", "--out", tmp_path / "d1").returncode == 0
    line = fleet_error(publish(aws, unsigned_bundle, "no-such-bucket", test_key[0], "--thing", "device-1"))
    assert "HeadBucket" in line and "aws s3 mb s3://no-such-bucket" in line


def test_unknown_thing_is_one_line(aws, bucket, unsigned_bundle, test_key):
    line = fleet_error(publish(aws, unsigned_bundle, bucket, test_key[0], "--thing", "ghost"))
    assert "DescribeThing" in line and "edge-fleet provision ghost" in line


def test_bad_bundle_is_one_line_before_any_upload(aws, tmp_path, bucket, test_key):
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("model.tflite", b"not a model")
    line = fleet_error(publish(aws, broken, bucket, test_key[0], "--thing", "device-1"))
    assert "manifest.json" in line
    assert "Contents" not in client(aws, "s3").list_objects_v2(Bucket=bucket)


def test_bundle_signed_by_another_key_is_refused(aws, tmp_path, bucket, test_key, other_key):
    bundle = make_bundle(tmp_path / "b", other_key[0])
    line = fleet_error(publish(aws, bundle, bucket, test_key[0], "--thing", "device-1"))
    assert f"signed by key {key_id(load_public_key(other_key[1]))}, not by --signing-key" in line
    assert "trusted_keys" not in line  # advice for the operator, not for a device


def test_jobs_need_a_presign_role(aws, bucket, unsigned_bundle, test_key):
    result = fleet(aws, "model", "publish", unsigned_bundle, "--bucket", bucket, "--signing-key", test_key[0], "--thing", "d")
    assert "--presign-role-arn" in fleet_error(result)


def test_bad_rollout_option_names_the_flag(aws, bucket, unsigned_bundle, test_key):
    line = fleet_error(publish(aws, unsigned_bundle, bucket, test_key[0], "--thing", "d", "--increment-factor", "9"))
    assert "--increment-factor" in line


# --- Greengrass v2 and connectivity: recorded request shapes (Stubber) ---------------------------------------


@pytest.fixture
def fleet_aws(aws):
    from agent.fleet.aws import Aws, AwsOptions

    return Aws(AwsOptions(region=REGION, endpoint_url=aws))


def test_greengrass_publish_makes_a_component_version_and_keeps_the_groups_other_components(fleet_aws, tmp_path, bucket, unsigned_bundle, test_key):
    from agent.fleet.publish import prepare, upload
    from agent.fleet.rollout import (
        DEFAULT_RECIPE,
        Rollout,
        artifact_file_name,
        load_recipe,
        roll_out,
    )

    recipe = load_recipe(DEFAULT_RECIPE)
    artifact, release = prepare(unsigned_bundle, test_key[0], tmp_path, bucket, artifact_file_name(recipe))
    # The nucleus unpacks the zip to a folder named after it, which the agent component's Run script names.
    assert release.key.endswith("/mnist-bundle.zip")
    upload(fleet_aws, artifact, release)
    group_arn = f"arn:aws:iot:{REGION}:123456789012:thinggroup/line-a"
    rollout = Rollout(base_rate_per_minute=2)
    model = recipe["ComponentName"]
    [manifest] = recipe["Manifests"]
    expected_recipe = {**recipe, "ComponentVersion": "1.2.0", "Manifests": [{**manifest, "Artifacts": [{**manifest["Artifacts"][0], "Uri": f"s3://{bucket}/{release.key}"}]}]}

    with Stubber(fleet_aws.client("greengrassv2")) as stub:
        stub.add_response("create_component_version", {"componentName": model, "componentVersion": "1.2.0", "creationTimestamp": 0, "status": {}}, {"inlineRecipe": json.dumps(expected_recipe).encode()})
        stub.add_response("list_deployments", {"deployments": [{"deploymentId": "d-1"}]}, {"targetArn": group_arn, "historyFilter": "LATEST_ONLY"})
        agent = {"com.example.EdgeAgent": {"componentVersion": "0.1.0", "configurationUpdate": {"merge": "{}"}}}
        policies = {"failureHandlingPolicy": "ROLLBACK", "componentUpdatePolicy": {"action": "NOTIFY_COMPONENTS", "timeoutInSeconds": 120}}
        stub.add_response("get_deployment", {"deploymentId": "d-1", "components": {**agent, model: {"componentVersion": "0.9.0"}}, "deploymentPolicies": policies}, {"deploymentId": "d-1"})
        stub.add_response(
            "create_deployment",
            {"deploymentId": "d-2", "iotJobId": "job-2"},
            {
                "targetArn": group_arn,
                "deploymentName": f"{model} 1.2.0",
                "components": {**agent, model: {"componentVersion": "1.2.0"}},
                "deploymentPolicies": policies,
                "iotJobConfiguration": rollout.job_configuration(),
            },
        )
        result = roll_out(fleet_aws, release, group_arn, "greengrass", rollout, presign_role_arn=None, recipe=DEFAULT_RECIPE, new_component=True)
        stub.assert_no_pending_responses()
    assert (result["deployment_id"], result["iot_job_id"]) == ("d-2", "job-2")
    assert rollout.job_configuration()["jobExecutionsRolloutConfig"]["exponentialRate"]["baseRatePerMinute"] == 2


def test_greengrass_rollback_redeploys_the_existing_component_version(fleet_aws, tmp_path, bucket, unsigned_bundle, test_key):
    from agent.fleet.publish import find_release, prepare, upload
    from agent.fleet.rollout import DEFAULT_RECIPE, Rollout, roll_out

    artifact, release = prepare(unsigned_bundle, test_key[0], tmp_path, bucket)
    upload(fleet_aws, artifact, release)
    found = find_release(fleet_aws, bucket, "1.2.0", None)
    assert found == release
    group_arn = f"arn:aws:iot:{REGION}:123456789012:thinggroup/line-a"
    with Stubber(fleet_aws.client("greengrassv2")) as stub:
        stub.add_response("list_deployments", {"deployments": []}, {"targetArn": group_arn, "historyFilter": "LATEST_ONLY"})
        components = {"com.example.EdgeAgent.MnistModel": {"componentVersion": "1.2.0"}}
        stub.add_response("create_deployment", {"deploymentId": "d-3"}, {"targetArn": group_arn, "deploymentName": ANY, "components": components, "deploymentPolicies": ANY, "iotJobConfiguration": ANY})
        roll_out(fleet_aws, found, group_arn, "greengrass", Rollout(), presign_role_arn=None, recipe=DEFAULT_RECIPE, new_component=False)
        stub.assert_no_pending_responses()


def test_greengrass_access_denied_is_one_line_naming_the_call(fleet_aws):
    from agent.fleet.aws import CloudError

    with Stubber(fleet_aws.client("greengrassv2")) as stub:
        stub.add_client_error("list_deployments", "AccessDeniedException", "not authorized", 403)
        with pytest.raises(CloudError) as caught:
            fleet_aws.call("greengrassv2", "list_deployments", targetArn="arn:aws:iot:us-east-1:1:thinggroup/g")
    assert str(caught.value) == "AWS greengrassv2 ListDeployments failed: AccessDeniedException: not authorized; check the credentials in use and that their IAM policy allows greengrassv2:ListDeployments"


def _indexed_thing(n: int, version: str) -> dict:
    shadow = {"reported": {"model": {"name": "mnist-int8", "version": version}}, "metadata": {"reported": {"model": {"version": {"timestamp": 1_790_000_000 + n}}}}, "version": 3, "hasDelta": False}
    return {"thingName": f"cam-{n:04d}", "shadow": json.dumps(shadow), "connectivity": {"connected": n % 100 != 7, "timestamp": 1_790_000_500_000}}


def _execution(n: int, status: str) -> dict:
    return {"thingArn": f"arn:aws:iot:{REGION}:123456789012:thing/cam-{n:04d}", "jobExecutionSummary": {"status": status, "executionNumber": 1}}


FLEET = 1200
INDEXED = {"thingIndexingConfiguration": {"thingIndexingMode": "REGISTRY_AND_SHADOW", "thingConnectivityIndexingMode": "STATUS"}}


def test_status_at_scale_reads_fleet_indexing_one_request_per_page(fleet_aws):
    """1,200 devices: 3 SearchIndex pages, 5 execution pages, one DescribeJobExecution per failure; not 3,600 requests."""
    from agent.fleet.status import fleet_status

    versions = {n: "2.0.0" if n < 1150 else "1.0.0" for n in range(FLEET)}
    statuses = {n: "SUCCEEDED" if n < 1150 else ("FAILED" if n < 1152 else "IN_PROGRESS") for n in range(FLEET)}
    group = {"thingGroupName": "line-a"}
    with Stubber(fleet_aws.client("iot")) as stub:
        stub.add_response("describe_thing_group", {"thingGroupName": "line-a"}, group)
        stub.add_response("get_indexing_configuration", INDEXED, {})
        for page, start in enumerate(range(0, FLEET, 500)):
            reply = {"things": [_indexed_thing(n, versions[n]) for n in range(start, min(start + 500, FLEET))]}
            if start + 500 < FLEET:
                reply["nextToken"] = f"t{page + 1}"
            stub.add_response("search_index", reply, {"queryString": "thingGroupNames:line-a", "maxResults": 500, **({"nextToken": f"t{page}"} if page else {})})
        stub.add_response("list_jobs", {"jobs": [{"jobId": "old", "createdAt": 1}, {"jobId": "rollout-2", "createdAt": 2}]}, group)
        for page, start in enumerate(range(0, FLEET, 250)):
            reply = {"executionSummaries": [_execution(n, statuses[n]) for n in range(start, min(start + 250, FLEET))]}
            if start + 250 < FLEET:
                reply["nextToken"] = f"e{page + 1}"
            stub.add_response("list_job_executions_for_job", reply, {"jobId": "rollout-2", "maxResults": 250, **({"nextToken": f"e{page}"} if page else {})})
        for n in (1150, 1151):
            details = {"detailsMap": {"reason": "SHA256_MISMATCH", "message": "download does not match its sha256"}}
            stub.add_response("describe_job_execution", {"execution": {"jobId": "rollout-2", "status": "FAILED", "statusDetails": details}}, {"jobId": "rollout-2", "thingName": f"cam-{n:04d}"})
        status = fleet_status(fleet_aws, "line-a")
        stub.assert_no_pending_responses()
    assert status.source == "fleet-index"
    assert len(status.devices) == FLEET and status.versions == {"1.0.0": 50, "2.0.0": 1150}
    assert [(d.thing, d.reason) for d in status.failed] == [("cam-1150", "SHA256_MISMATCH download does not match its sha256"), ("cam-1151", "SHA256_MISMATCH download does not match its sha256")]
    device = status.devices[7]
    assert (device.thing, device.job_id, device.job_status, device.connected, device.last_seen) == ("cam-0007", "rollout-2", "SUCCEEDED", False, "2026-09-21T14:21:40Z")  # its disconnect, newer than its shadow


def test_status_falls_back_device_by_device_when_the_index_is_not_ready(fleet_aws):
    from agent.fleet.status import fleet_status

    with Stubber(fleet_aws.client("iot")) as iot, Stubber(fleet_aws.client("iot-data")) as data:
        iot.add_response("get_indexing_configuration", INDEXED, {})
        iot.add_client_error("search_index", "IndexNotReadyException", "index is being rebuilt", 400)
        iot.add_response("list_things", {"things": [{"thingName": "cam-0001"}]}, {})
        data.add_client_error("get_thing_shadow", "ResourceNotFoundException", "No shadow exists", 404)
        iot.add_response("list_job_executions_for_thing", {"executionSummaries": []}, {"thingName": "cam-0001"})
        data.add_client_error("get_retained_message", "ResourceNotFoundException", "No retained message", 404, {"topic": "edge/cam-0001/status"})
        status = fleet_status(fleet_aws, None)
        iot.assert_no_pending_responses()
        data.assert_no_pending_responses()
    assert status.source == "per-device" and [d.thing for d in status.devices] == ["cam-0001"]


def test_watch_with_fleet_indexing_asks_only_for_counts(fleet_aws):
    import io

    from agent.fleet.status import watch

    def counts(succeeded: int, failed: int, in_progress: int, queued: int) -> dict:
        return {"numberOfSucceededThings": succeeded, "numberOfFailedThings": failed, "numberOfInProgressThings": in_progress, "numberOfQueuedThings": queued}

    query = {"queryString": "thingGroupNames:line-a"}
    out = io.StringIO()
    with Stubber(fleet_aws.client("iot")) as stub:
        stub.add_response("describe_thing_group", {"thingGroupName": "line-a"}, {"thingGroupName": "line-a"})
        stub.add_response("get_indexing_configuration", INDEXED, {})
        stub.add_response("list_jobs", {"jobs": [{"jobId": "rollout-2", "createdAt": 2}]}, {"thingGroupName": "line-a"})
        for version_counts, process, job_status in (
            ([("1.0.0", 3000)], counts(0, 0, 10, 40), "IN_PROGRESS"),
            ([("2.0.0", 2997), ("1.0.0", 3)], counts(2997, 3, 0, 0), "COMPLETED"),
        ):
            stub.add_response("get_statistics", {"statistics": {"count": 3000}}, query)
            buckets = {"buckets": [{"keyValue": version, "count": count} for version, count in version_counts]}
            stub.add_response("get_buckets_aggregation", buckets, {**query, "aggregationField": "shadow.reported.model.version", "bucketsAggregationType": {"termsAggregation": {"maxBuckets": 20}}})
            stub.add_response("describe_job", {"job": {"jobId": "rollout-2", "status": job_status, "jobProcessDetails": process}}, {"jobId": "rollout-2"})
        stub.add_response("search_index", {"things": [_indexed_thing(n, "2.0.0" if n > 2 else "1.0.0") for n in range(3000)]}, {**query, "maxResults": 500})
        stub.add_response("list_job_executions_for_job", {"executionSummaries": [_execution(n, "FAILED" if n < 3 else "SUCCEEDED") for n in range(3000)]}, {"jobId": "rollout-2", "maxResults": 250})
        for n in range(3):
            stub.add_response("describe_job_execution", {"execution": {"status": "FAILED", "statusDetails": {"detailsMap": {"reason": "SHA256_MISMATCH"}}}}, {"jobId": "rollout-2", "thingName": f"cam-{n:04d}"})
        status = watch(fleet_aws, "line-a", 0.01, out=out)
        stub.assert_no_pending_responses()
    frames = out.getvalue().replace("\r", "\n").splitlines()
    bars = [frame for frame in frames if frame.startswith("rollout rollout-2")]
    assert "in progress 10 queued 40 | models 1.0.0: 3000" in bars[0] and "0/3000" in bars[0]
    assert "3000/3000" in bars[-1] and "succeeded 2997 failed 3 | models 1.0.0: 3, 2.0.0: 2997" in bars[-1]
    assert frames[-4:] == ["cam-0000: FAILED SHA256_MISMATCH", "cam-0001: FAILED SHA256_MISMATCH", "cam-0002: FAILED SHA256_MISMATCH", "3000 devices; models 1.0.0: 3, 2.0.0: 2997; failed: 3"]
    assert len(status.failed) == 3


def test_every_command_has_help():
    for command in (("provision",), ("model", "publish"), ("model", "rollback"), ("fleet", "status"), ("job", "cancel")):
        result = run_cli(*command, "--help", program="agent.fleet")
        assert result.returncode == 0 and "usage: edge-fleet" in result.stdout
        assert ("--dry-run" in result.stdout) == (command != ("fleet", "status"))
        if "--dry-run" in result.stdout:  # a dry run still reads the account: the operator must know it needs both
            assert "needs credentials and the network" in " ".join(result.stdout.split())


def test_greengrass_dry_run_reads_the_current_deployment_and_records_the_rest(aws, tmp_path, bucket, unsigned_bundle, test_key):
    from agent.fleet.aws import Aws, AwsOptions
    from agent.fleet.publish import prepare
    from agent.fleet.rollout import DEFAULT_RECIPE, Rollout, roll_out

    dry = Aws(AwsOptions(region=REGION, endpoint_url=aws, dry_run=True))
    _, release = prepare(unsigned_bundle, test_key[0], tmp_path, bucket)
    group_arn = f"arn:aws:iot:{REGION}:123456789012:thinggroup/line-a"
    with Stubber(dry.client("greengrassv2")) as stub:  # only the read is sent
        stub.add_response("list_deployments", {"deployments": []}, {"targetArn": group_arn, "historyFilter": "LATEST_ONLY"})
        result = roll_out(dry, release, group_arn, "greengrass", Rollout(), presign_role_arn=None, recipe=DEFAULT_RECIPE, new_component=True)
        stub.assert_no_pending_responses()
    assert [request["operation"] for request in dry.planned] == ["CreateComponentVersion", "CreateDeployment"]
    assert result["deployment_id"] == "<deploymentId>"


def test_iot_data_requests_go_to_the_accounts_ats_endpoint(aws_env):
    from agent.fleet.aws import Aws, AwsOptions

    real = Aws(AwsOptions(region=REGION))
    with Stubber(real.client("iot")) as stub:
        stub.add_response("describe_endpoint", {"endpointAddress": "abc123-ats.iot.us-east-1.amazonaws.com"}, {"endpointType": "iot:Data-ATS"})
        data = real.client("iot-data")
    assert data.meta.endpoint_url == "https://abc123-ats.iot.us-east-1.amazonaws.com"
