"""Model bundles: the shipped one verifies, a bundle round-trips through pack/sign/verify/load, and
every kind of bad bundle is refused with one ModelError line before any model is loaded."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from bundle_helpers import (  # noqa: F401 (fixtures)
    copy_bundle,
    make_bundle,
    other_key,
    repack,
    test_key,
    write_signed_raw,
)
from conftest import SHIPPED_BUNDLE, run_cli

from agent.bundles.bundle import open_bundle
from agent.bundles.signing import key_id, load_private_key, load_public_key, sign
from agent.errors import ModelError, Reason
from agent.fleet.cli import main as fleet_main
from agent.inference.model import load_model
from agent.settings import DEV_SIGNING_KEY, ModelSettings, TaskSettings

DEV_KEY = DEV_SIGNING_KEY  # the key that signs the shipped bundle


def refused(match: str, call, *args, reason: Reason | None = None, **kwargs) -> str:
    """Assert `call` raises a one-line ModelError containing `match` (and carrying `reason`); returns the message."""
    with pytest.raises(ModelError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    assert reason is None or caught.value.reason == reason, caught.value.reason
    return message


def test_shipped_bundle_is_signed_by_the_development_key():
    bundle = open_bundle(SHIPPED_BUNDLE, trusted_keys=[DEV_KEY])
    assert bundle.signer == key_id(load_public_key(DEV_KEY))
    assert (bundle.manifest.name, bundle.manifest.task, bundle.manifest.input.preprocessing) == ("mnist-int8", "classification", "mnist-digits")
    assert bundle.golden_x.shape[1:] == (28, 28) and len(bundle.golden_x) == len(bundle.golden_y) >= 100


def test_round_trip_through_fleet_cli_pack_sign_verify_load(tmp_path, test_key, capsys):
    private, public = test_key
    bundle = copy_bundle(tmp_path / "bundle")
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["version"] = "1.0.1"
    (bundle / "manifest.json").write_text(json.dumps(raw))
    archive = tmp_path / "mnist-int8-1.0.1.zip"
    assert fleet_main(["model", "pack", str(bundle)]) == 0
    assert fleet_main(["model", "sign", str(bundle), "--key", str(private)]) == 0
    assert fleet_main(["model", "pack", str(bundle), "--zip", str(archive)]) == 0
    capsys.readouterr()
    for path in (bundle, archive):
        model = load_model(path, ModelSettings(trusted_keys=[public]), TaskSettings())
        assert model.manifest.version == "1.0.1" and model.bundle.signer == key_id(load_public_key(public))
        assert model.check_golden().passed
    verified = run_cli("model", "verify", archive, "--trusted-key", public)
    assert verified.returncode == 0 and json.loads(verified.stdout)["version"] == "1.0.1", verified.stderr


def test_signing_a_zip_and_packing_are_reproducible(tmp_path, test_key):
    private, public = test_key
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    for archive in (first, second):
        assert fleet_main(["model", "pack", str(copy_bundle(tmp_path / archive.stem)), "--zip", str(archive)]) == 0
        assert fleet_main(["model", "sign", str(archive), "--key", str(private)]) == 0
    assert first.read_bytes() == second.read_bytes()
    assert open_bundle(first, trusted_keys=[public]).signer is not None


def test_unsigned_bundle_allowed_only_when_signatures_are_not_required(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", private_key=None)
    assert open_bundle(bundle, trusted_keys=[test_key[1]], require_signature=False).signer is None
    refused("not signed", open_bundle, bundle, trusted_keys=[test_key[1]], reason=Reason.UNSIGNED)


def test_tampered_model(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.tflite").write_bytes(bytes(data))
    refused("model.tflite does not match its sha256", load_model, bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())


def test_tampered_manifest(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["min_golden_accuracy"] = 0.0
    (bundle / "manifest.json").write_text(json.dumps(raw))
    refused("does not match its signature", open_bundle, bundle, trusted_keys=[test_key[1]])


def test_wrong_signature_from_a_trusted_key_id(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    (bundle / "manifest.sig").write_bytes(sign(b"another manifest", load_private_key(test_key[0])))
    refused("does not match its signature", open_bundle, bundle, trusted_keys=[test_key[1]])


def test_garbage_signature_file(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    (bundle / "manifest.sig").write_bytes(b"\x00not a signature")
    refused("not a valid signature file", open_bundle, bundle, trusted_keys=[test_key[1]])


def test_untrusted_key(tmp_path, test_key, other_key):
    bundle = make_bundle(tmp_path / "b", other_key[0])
    signer = key_id(load_public_key(other_key[1]))
    refused(f"untrusted key {signer}", open_bundle, bundle, trusted_keys=[test_key[1]], reason=Reason.UNTRUSTED_KEY)
    refused("untrusted key", open_bundle, bundle, trusted_keys=[])


def test_trusted_key_file_that_is_not_a_key(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    (tmp_path / "bad.pub").write_text("not a key")
    refused("bad.pub", open_bundle, bundle, trusted_keys=[tmp_path / "bad.pub"])


@pytest.mark.parametrize("model_bytes", [
    pytest.param(lambda data: data[: len(data) // 3], id="truncated"),
    pytest.param(lambda data: b"this is not a flatbuffer " * 200, id="not-tflite"),
])
def test_truncated_or_non_tflite_model(tmp_path, test_key, model_bytes):
    bundle = copy_bundle(tmp_path / "b")
    (bundle / "model.tflite").write_bytes(model_bytes((SHIPPED_BUNDLE / "model.tflite").read_bytes()))
    repack(bundle, test_key[0])
    refused("not a loadable TFLite model", load_model, bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings(), reason=Reason.NOT_TFLITE)


@pytest.mark.parametrize("edit, match", [
    pytest.param(lambda raw: raw["input"].update(scale=0.5), "input tensor is int8[1, 28, 28, 1] scale 0.00392157", id="input-scale"),
    pytest.param(lambda raw: raw["input"].update(shape=[1, 32, 32, 1]), "manifest says int8[1, 32, 32, 1]", id="input-shape"),
    pytest.param(lambda raw: raw["output"].update(dtype="uint8"), "output tensor", id="output-dtype"),
    pytest.param(lambda raw: raw.update(labels=[*raw["labels"], "10"]), "10 outputs but the manifest has 11 labels", id="labels"),
])
def test_real_tensors_disagree_with_manifest(tmp_path, test_key, edit, match):
    bundle = copy_bundle(tmp_path / "b")

    def edit_consistently(raw):
        """Only the tensor claim is wrong: labels.txt and the golden set follow the edited manifest."""
        edit(raw)
        (bundle / "labels.txt").write_text("\n".join(raw["labels"]) + "\n")
        height, width = raw["input"]["shape"][1:3]
        np.savez(bundle / "golden.npz", x=np.zeros((3, height, width), np.uint8), y=np.zeros(3, np.uint8))

    repack(bundle, test_key[0], edit_consistently)
    refused(match, load_model, bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings(), reason=Reason.TENSOR_MISMATCH)


def test_unknown_manifest_task_is_refused_when_the_bundle_is_opened(tmp_path, test_key):
    bundle = copy_bundle(tmp_path / "b")
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["task"] = "segmentation"
    write_signed_raw(bundle, raw, test_key[0])
    refused("unknown task 'segmentation'", open_bundle, bundle, trusted_keys=[test_key[1]], reason=Reason.INVALID_BUNDLE)


def test_a_task_this_agent_does_not_know_is_refused_when_the_model_is_loaded(tmp_path, test_key):
    bundle = copy_bundle(tmp_path / "b")
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["input"]["preprocessing"] = "coco-letterbox"
    write_signed_raw(bundle, raw, test_key[0])
    message = refused("task 'coco-letterbox', which this agent does not know", load_model, bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    assert "mnist-digits" in message


def test_listed_file_missing_and_unlisted_file_present(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    (bundle / "extra.bin").write_bytes(b"smuggled")
    refused("extra.bin is not listed", open_bundle, bundle, trusted_keys=[test_key[1]])
    (bundle / "extra.bin").unlink()
    (bundle / "golden.npz").unlink()
    refused("golden.npz is listed in the manifest but missing", open_bundle, bundle, trusted_keys=[test_key[1]])


def test_labels_file_disagreeing_with_manifest(tmp_path, test_key):
    bundle = copy_bundle(tmp_path / "b")
    (bundle / "labels.txt").write_text("\n".join("abcdefghij") + "\n")
    repack(bundle, test_key[0])
    refused("labels.txt does not match", open_bundle, bundle, trusted_keys=[test_key[1]])


def _zip_with(path: Path, source: Path, extra: zipfile.ZipInfo, data: bytes = b"x") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(source.iterdir()):
            archive.write(file, file.name)
        archive.writestr(extra, data)
    return path


@pytest.mark.parametrize("name, mode, match", [
    ("../escaped.txt", 0o100644, "escapes the bundle directory"),
    ("sub/../../escaped.txt", 0o100644, "escapes the bundle directory"),
    ("/tmp/absolute.txt", 0o100644, "escapes the bundle directory"),
    ("C:/windows.txt", 0o100644, "escapes the bundle directory"),
    ("link", 0o120777, "is a symlink"),
])
def test_zip_entries_escaping_the_bundle(tmp_path, test_key, name, mode, match):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    archive = _zip_with(tmp_path / "evil.zip", bundle, info, b"/etc/passwd")
    refused(match, open_bundle, archive, trusted_keys=[test_key[1]])
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute.txt").exists()


def test_symlink_inside_a_bundle_directory(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    os.symlink("/etc/hostname", bundle / "extra")
    assert stat.S_ISLNK((bundle / "extra").lstat().st_mode)
    refused("is a symlink", open_bundle, bundle, trusted_keys=[test_key[1]])


def test_bundle_over_the_size_limit(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    archive = tmp_path / "b.zip"
    assert fleet_main(["model", "pack", str(bundle), "--zip", str(archive)]) == 0
    limit = 64 * 1024  # the shipped bundle is bigger than this, packed or not
    refused("over the limit of 65536", open_bundle, bundle, trusted_keys=[test_key[1]], max_bytes=limit)
    refused("over the limit of 65536", open_bundle, archive, trusted_keys=[test_key[1]], max_bytes=limit)


def test_zip_bomb_declared_size_over_limit(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    info = zipfile.ZipInfo("padding.bin")
    info.compress_type = zipfile.ZIP_DEFLATED
    archive = _zip_with(tmp_path / "bomb.zip", bundle, info, bytes(8 * 1024 * 1024))
    assert archive.stat().st_size < 1024 * 1024
    refused("unpacks to", open_bundle, archive, trusted_keys=[test_key[1]], max_bytes=4 * 1024 * 1024)


def test_not_a_bundle(tmp_path):
    refused("not found", open_bundle, tmp_path / "missing", trusted_keys=[DEV_KEY])
    (tmp_path / "junk.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    refused("not a readable bundle zip", open_bundle, tmp_path / "junk.zip", trusted_keys=[DEV_KEY])
    (tmp_path / "empty").mkdir()
    refused("no manifest.json", open_bundle, tmp_path / "empty", trusted_keys=[DEV_KEY])


def test_edge_agent_model_verify_prints_one_line_and_exits_2(tmp_path, test_key):
    bundle = make_bundle(tmp_path / "b", test_key[0])
    (bundle / "model.tflite").write_bytes(b"tampered")
    result = run_cli("model", "verify", bundle, "--trusted-key", test_key[1])
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "model.tflite does not match its sha256" in result.stderr


def test_edge_fleet_keygen_never_overwrites(tmp_path):
    key = tmp_path / "fleet.key"
    result = run_cli("model", "keygen", "--key", key, program="agent.fleet")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.with_suffix(".pub").exists()
    assert json.loads(result.stdout)["key_id"] == key_id(load_public_key(key.with_suffix(".pub")))
    again = run_cli("model", "keygen", "--key", key, program="agent.fleet")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_edge_fleet_sign_with_a_missing_key_is_one_line(tmp_path):
    bundle = copy_bundle(tmp_path / "b")
    result = run_cli("model", "sign", bundle, "--key", tmp_path / "nope.key", program="agent.fleet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nope.key" in result.stderr
