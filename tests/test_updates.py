"""Model updates end to end on real parts: HTTPS download, signed bundles, TFLite, a pipeline serving video.

Every update runs while a real pipeline serves the sample video at 30 fps. Each bad update must come back
FAILED (or REJECTED) with its reason code, leave the old model serving, and lose no frame.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from artifact_server import serve
from conftest import REPO, SHIPPED_BUNDLE
from update_helpers import (  # noqa: F401 (fixtures)
    DATA,
    NEW,
    SERVING,
    Serving,
    artifacts,
    document,
    keys,
    later,
    make_bundle,
    serving,
)

from agent.app import load_configured_model
from agent.bundles.document import Status, document_signed_bytes, job_document_schema
from agent.bundles.signing import load_private_key, sign
from agent.errors import Reason
from agent.inference.slot import ModelSlot
from agent.settings import AMAZON_ROOT_CA, ModelSettings, Settings
from agent.updates.manager import Stage, UpdateManager


def assert_refused(s: Serving, outcome, reason: Reason, status: Status = Status.FAILED):
    assert (outcome.status, outcome.reason) == (status, reason), outcome.message
    assert outcome.message and "\n" not in outcome.message
    s.wait_frames(3)
    assert s.slot.active.ref.version == SERVING
    assert s.log.versions()[-1] == SERVING
    assert s.manager.store.state().active is None
    s.assert_no_frame_lost()


def test_a_good_update_is_served_from_one_frame_to_the_next_and_recorded(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    url = artifacts.publish("/good/mnist-0.2.0.zip", data)
    progress = []
    outcome = s.manager.apply(document(url, data), lambda stage, percent: progress.append((stage, percent)))

    assert outcome.status == Status.SUCCEEDED and outcome.reason is None, outcome.message
    assert s.slot.active.ref.version == NEW
    assert s.manager.store.state().active.version == NEW
    assert s.manager.store.state().active.artifact_sha256 == hashlib.sha256(data).hexdigest()
    s.wait_frames(3)
    s.assert_no_frame_lost()
    versions = s.log.versions()
    switch = versions.index(NEW)
    assert set(versions[:switch]) == {SERVING} and set(versions[switch:]) == {NEW}  # one switch, no flapping

    stages = [stage for stage, _ in progress]
    assert stages[0] == Stage.DOWNLOADING and progress[stages.index(Stage.VERIFYING) - 1] == (Stage.DOWNLOADING, 100)
    assert [st for i, st in enumerate(stages) if i == 0 or stages[i - 1] != st] == [
        Stage.DOWNLOADING, Stage.VERIFYING, Stage.VALIDATING, Stage.ACTIVATING, Stage.WATCHING, Stage.ACTIVATING,
    ]
    assert all(0 <= percent <= 100 for _, percent in progress)

    again = s.manager.apply(document(url, data))  # a duplicate delivery does nothing twice
    assert again.status == Status.SUCCEEDED and "already serving" in again.message
    assert len([p for p, _ in artifacts.requests if p == "/good/mnist-0.2.0.zip"]) == 1


def test_a_restarted_agent_serves_the_stored_model(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key", version=later(3))
    assert s.manager.apply(document(artifacts.publish("/good/restart.zip", data), data, version=later(3))).status == Status.SUCCEEDED
    s.stop()
    settings = Settings()
    fresh = ModelSlot(load_configured_model(settings))
    manager = UpdateManager(s.settings, ModelSettings(trusted_keys=[keys / "trusted.pub"]), settings.tasks, fresh)
    replaced = manager.restore()
    assert replaced.ref.version == SERVING and fresh.active.ref.version == later(3)


def test_an_older_version_is_rejected_unless_the_document_allows_it(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key", version="0.0.9")
    url = artifacts.publish("/old/0.0.9.zip", data)
    assert_refused(s, s.manager.apply(document(url, data, version="0.0.9")), Reason.DOWNGRADE_REFUSED, Status.REJECTED)
    assert not any(p == "/old/0.0.9.zip" for p, _ in artifacts.requests)  # refused before downloading
    assert s.manager.apply(document(url, data, version="0.0.9", allow_downgrade=True)).status == Status.SUCCEEDED
    assert s.slot.active.ref.version == "0.0.9"


def test_an_interrupted_download_resumes_where_it_stopped(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    outcome = s.manager.apply(document(artifacts.publish("/flaky/resume.zip", data), data))
    assert outcome.status == Status.SUCCEEDED, outcome.message
    ranges = [r for p, r in artifacts.requests if p == "/flaky/resume.zip"]
    assert ranges == [None, f"bytes={len(data) // 2}-"]


def test_a_document_signed_by_a_trusted_key_is_accepted_and_a_forged_one_refused_before_download(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    url = artifacts.publish("/signed/doc.zip", data)
    doc = document(url, data)
    signed = json.loads(sign(document_signed_bytes(doc["name"], doc["version"], doc["sha256"], doc["size"]), load_private_key(keys / "trusted.key")))
    forged = {**doc, "signature": signed, "size": doc["size"] + 1}
    assert_refused(s, s.manager.apply(forged), Reason.BAD_SIGNATURE)
    assert not any(p == "/signed/doc.zip" for p, _ in artifacts.requests)
    assert s.manager.apply({**doc, "signature": signed}).status == Status.SUCCEEDED


def test_greengrass_bundle_on_disk_goes_through_the_same_checks(serving, tmp_path, keys):
    s = serving()
    good = tmp_path / "component" / "bundle.zip"
    good.parent.mkdir()
    good.write_bytes(make_bundle(tmp_path, keys / "trusted.key", version=later(4)))
    unsigned = tmp_path / "component" / "unsigned.zip"
    unsigned.write_bytes(make_bundle(tmp_path, None, version=later(5)))
    assert_refused(s, s.manager.apply_bundle(unsigned), Reason.UNSIGNED)
    outcome = s.manager.apply_bundle(good)
    assert outcome.status == Status.SUCCEEDED and s.slot.active.ref.version == later(4)


def _low_golden_labels():
    with np.load(SHIPPED_BUNDLE / "golden.npz") as golden:
        return golden["x"], (golden["y"] + 1) % 10  # every label wrong


def _faint_golden():
    """The golden images whose pixels sum below update-crash.tflite's limit (100): it runs on these."""
    with np.load(SHIPPED_BUNDLE / "golden.npz") as golden:
        faint = (golden["x"].astype(np.float32) / 255).reshape(len(golden["x"]), -1).sum(axis=1) < 90
        return golden["x"][faint], golden["y"][faint]


def _rewrite_min_accuracy(root: Path):
    raw = json.loads((root / "manifest.json").read_text())
    raw["min_golden_accuracy"] = 0.5
    (root / "manifest.json").write_text(json.dumps(raw))


def _float_model(model: str) -> dict:
    spec = {"dtype": "float32", "scale": 0.0, "zero_point": 0}
    manifest = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())
    return {
        "model": DATA / model,
        "input": {**manifest["input"], **spec},
        "output": {**manifest["output"], **spec},
        "min_golden_accuracy": 0.0,  # the operator set no gate: only the health window can catch these
    }


# name -> (bundle options, document changes, URL path, expected reason, expected status)
BAD_UPDATES = {
    "sha256 mismatch": ({}, {"sha256": "0" * 64}, "/a/sha.zip", Reason.SHA256_MISMATCH, Status.FAILED),
    "bad signature": ({"tamper": _rewrite_min_accuracy}, {}, "/a/badsig.zip", Reason.BAD_SIGNATURE, Status.FAILED),
    "unsigned": ({"key": None}, {}, "/a/unsigned.zip", Reason.UNSIGNED, Status.FAILED),
    "untrusted key": ({"key": "stranger"}, {}, "/a/stranger.zip", Reason.UNTRUSTED_KEY, Status.FAILED),
    "truncated download": ({}, {}, "/truncated/a.zip", Reason.DOWNLOAD_FAILED, Status.FAILED),
    "not a TFLite file": ({"model": SHIPPED_BUNDLE / "labels.txt"}, {}, "/a/nottflite.zip", Reason.NOT_TFLITE, Status.FAILED),
    "wrong input shape": ({"model": DATA / "update-wrong-input.tflite"}, {}, "/a/shape.zip", Reason.TENSOR_MISMATCH, Status.FAILED),
    "golden accuracy below the gate": ({"golden": _low_golden_labels()}, {}, "/a/golden.zip", Reason.GOLDEN_ACCURACY, Status.FAILED),
    "model fails on the golden set": (_float_model("update-crash.tflite"), {}, "/a/crash.zip", Reason.MODEL_FAILED, Status.FAILED),
    "plain http url": ({}, {"url": "http://localhost:1/a.zip"}, None, Reason.URL_REFUSED, Status.FAILED),
    "over the size limit": ({}, {"size": 64 * 1024 * 1024}, "/a/big.zip", Reason.TOO_LARGE, Status.FAILED),
    "malformed document": ({}, {"sha256": "not-a-hash"}, "/a/malformed.zip", Reason.MALFORMED_DOCUMENT, Status.FAILED),
    "path traversal in name": ({}, {"name": "../../etc"}, "/a/trav1.zip", Reason.UNSAFE_PATH, Status.FAILED),
    "path traversal in version": ({}, {"version": "1.0.0/../../x"}, "/a/trav2.zip", Reason.UNSAFE_PATH, Status.FAILED),
    "unknown operation": ({}, {"operation": "reboot"}, "/a/op.zip", Reason.UNKNOWN_OPERATION, Status.FAILED),
    "name differs from the bundle": ({}, {"name": "other-model"}, "/a/name.zip", Reason.NAME_MISMATCH, Status.FAILED),
    "missing url": ({}, {"url": None}, "/a/nourl.zip", Reason.MALFORMED_DOCUMENT, Status.FAILED),
    "unreplaced presign placeholder": ({}, {"url": "${aws:iot:s3-presigned-url-v2:https://s3.eu-west-1.amazonaws.com/b/k.zip}"}, None, Reason.URL_REFUSED, Status.FAILED),
}


@pytest.mark.parametrize("case", list(BAD_UPDATES))
def test_a_bad_update_fails_with_its_reason_and_the_old_model_keeps_serving(case, serving, tmp_path, keys, artifacts):
    options, changes, path, reason, status = BAD_UPDATES[case]
    options = dict(options)
    key = options.pop("key", "trusted")
    s = serving()
    data = make_bundle(tmp_path, keys / f"{key}.key" if key else None, **options)
    url = artifacts.publish(path, data) if path else "unused"
    doc = {k: v for k, v in {**document(url, data), **changes}.items() if v is not None}
    assert_refused(s, s.manager.apply(doc), reason, status)
    assert not [p for p in (tmp_path / "store").glob("*/*") if p.is_dir() and not p.name.startswith(".")]  # nothing left installed


@pytest.mark.parametrize(
    "model, symptom, golden",
    [("update-nan.tflite", "NaN", None), ("update-constant.tflite", "identical outputs", None), ("update-crash.tflite", "raised RuntimeError", _faint_golden())],
)
def test_a_model_that_misbehaves_in_its_health_window_is_rolled_back_without_losing_a_frame(model, symptom, golden, serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key", golden=golden, **_float_model(model))
    outcome = s.manager.apply(document(artifacts.publish(f"/health/{model}.zip", data), data))
    assert (outcome.status, outcome.reason) == (Status.FAILED, Reason.HEALTH_CHECK_FAILED), outcome.message
    assert symptom in outcome.message and "rolled back" in outcome.message
    assert s.slot.active.ref.version == SERVING and s.manager.store.state().active is None
    s.wait_frames(3)
    s.assert_no_frame_lost()
    versions = s.log.versions()
    assert NEW in versions and versions[-1] == SERVING  # it did serve, and was taken out again


def test_plain_http_is_accepted_when_allowed(serving, tmp_path, keys):
    server, stop = serve(tmp_path, tls=False)
    try:
        s = serving(download={"allow_http": True})
        data = make_bundle(tmp_path, keys / "trusted.key")
        outcome = s.manager.apply(document(server.publish("/plain.zip", data), data))
        assert outcome.status == Status.SUCCEEDED, outcome.message
    finally:
        stop()


def test_a_server_whose_certificate_is_not_trusted_is_refused(serving, tmp_path, keys, artifacts):
    s = serving(download={"ca_file": AMAZON_ROOT_CA})
    data = make_bundle(tmp_path, keys / "trusted.key")
    outcome = s.manager.apply(document(artifacts.publish("/tls/untrusted.zip", data), data))
    assert_refused(s, outcome, Reason.DOWNLOAD_FAILED)
    assert "certificate" in outcome.message


def test_the_published_job_document_schema_is_current_and_checks_documents(tmp_path, keys):
    published = json.loads((REPO / "deploy" / "jobs" / "model-update.schema.json").read_text())
    assert published == job_document_schema(), "regenerate: python -c 'import json; from agent.bundles.document import job_document_schema as s; print(json.dumps(s(), indent=2))' > deploy/jobs/model-update.schema.json"
    data = make_bundle(tmp_path, keys / "trusted.key")
    good = document("${aws:iot:s3-presigned-url-v2:https://s3.eu-west-1.amazonaws.com/bucket/models/mnist.zip}", data)
    jsonschema.validate(good, published)
    for bad in ({**good, "operation": "reboot"}, {**good, "name": "../x"}, {**good, "url": "ftp://x"}, {**good, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, published)


def test_every_outcome_is_told_to_the_listeners(serving, tmp_path, keys, artifacts):
    """How /metrics counts update attempts by outcome: the manager tells each listener every outcome."""
    s = serving()
    heard = []
    s.manager.listeners.append(heard.append)
    data = make_bundle(tmp_path, keys / "trusted.key")
    good = s.manager.apply(document(artifacts.publish("/told/good.zip", data), data))
    bad = s.manager.apply({"operation": "reboot"})
    on_disk = s.manager.apply_bundle(tmp_path / "no-such-bundle")
    assert heard == [good, bad, on_disk]
    assert [o.status for o in heard] == [Status.SUCCEEDED, Status.FAILED, Status.FAILED]
