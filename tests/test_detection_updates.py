"""The face bundle as a model update, on real parts (HTTPS download, signatures, TFLite, a pipeline serving
video at 30 fps): a job switches a device from digits to faces and back without a restart, and a face model
below its golden gate or broken while serving is refused or rolled back like a digit model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from conftest import REPO, SHIPPED_BUNDLE
from update_helpers import SERVING, artifacts, keys, serving  # noqa: F401 (fixtures)

from agent.bundles.document import Status
from agent.errors import Reason
from agent.fleet.packing import sign_bundle, write_manifest, write_zip

FACE_BUNDLE = REPO / "models" / "face" / "bundle"
DATA = Path(__file__).resolve().parent / "data"


class TaskLog:
    """Observer: (model name, task) of every result (publish_empty makes every frame a result), and whether
    its frame was in colour."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []
        self.in_colour: list[bool] = []

    def on_frame(self, frame, result, latency_ms):
        self.seen.append((result.model.name, result.task))
        self.in_colour.append(frame.image.ndim == 3)

    def runs(self) -> list[tuple[str, str]]:
        """The (model, task) pairs in the order they served, each once per run of frames."""
        return [pair for i, pair in enumerate(self.seen) if i == 0 or self.seen[i - 1] != pair]

    def last_frames_in_colour(self) -> list[bool]:
        """For each run, whether its last frame was in colour (the first may have been read before the swap)."""
        return [self.in_colour[i] for i, pair in enumerate(self.seen) if i == len(self.seen) - 1 or self.seen[i + 1] != pair]


def zipped(folder: Path, bundle: Path) -> tuple[Path, bytes]:
    out = folder / f"{bundle.name}-{len(list(folder.iterdir()))}.zip"
    write_zip(bundle, out)
    return out, out.read_bytes()


def face_variant(folder: Path, key: Path, *, model: Path | None = None, golden_shift: float = 0.0, **fields) -> Path:
    """The shipped face bundle with its model or golden boxes replaced and manifest fields changed, re-signed."""
    root = folder / f"face-{len(list(folder.iterdir()))}"
    shutil.copytree(FACE_BUNDLE, root, ignore=shutil.ignore_patterns("manifest.sig"))
    if model is not None:
        shutil.copyfile(model, root / "model.tflite")
    if golden_shift:
        with np.load(root / "golden.npz") as golden:
            arrays = dict(golden)
        arrays["boxes"] = arrays["boxes"] + np.float32([golden_shift, 0, 0, 0]) * arrays["boxes"][:, 2:3]
        np.savez(root / "golden.npz", **arrays)
    raw = json.loads((root / "manifest.json").read_text())
    raw.pop("files")
    write_manifest(root, {**raw, **fields})
    sign_bundle(root, key)
    return root


def job(url: str, data: bytes, name: str, version: str) -> dict:
    return {"operation": "model-update", "name": name, "version": version, "url": url, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_a_job_switches_a_device_from_digits_to_faces_and_back_without_a_restart(serving, tmp_path, artifacts):
    s = serving()
    tasks = TaskLog()
    s.pipeline.add_observer(tasks)
    s.wait_frames(3)
    faces = json.loads((FACE_BUNDLE / "manifest.json").read_text())
    _, face_zip = zipped(tmp_path, FACE_BUNDLE)  # signed by the development key, which devices trust by default
    outcome = s.manager.apply(job(artifacts.publish("/faces.zip", face_zip), face_zip, faces["name"], faces["version"]))
    assert outcome.status == Status.SUCCEEDED, outcome.message
    assert s.slot.active.ref.name == "face-detection" and s.manager.store.state().active.name == "face-detection"
    s.wait_frames(5)

    _, digit_zip = zipped(tmp_path, SHIPPED_BUNDLE)
    outcome = s.manager.apply(job(artifacts.publish("/digits.zip", digit_zip), digit_zip, "mnist-int8", SERVING))
    assert outcome.status == Status.SUCCEEDED, outcome.message
    assert s.slot.active.ref.name == "mnist-int8" and s.manager.store.state().active.name == "mnist-int8"
    s.wait_frames(5)
    s.assert_no_frame_lost()  # one pipeline, one source, every frame served: no restart
    assert tasks.runs() == [("mnist-int8", "mnist-digits"), ("face-detection", "detection"), ("mnist-int8", "mnist-digits")]
    assert tasks.last_frames_in_colour() == [False, True, False]  # the source follows the model: grey digits, colour faces


def test_a_face_bundle_signed_by_a_key_the_device_does_not_trust_is_refused(serving, tmp_path, keys):
    s = serving()
    (tmp_path / "variants").mkdir()
    outcome = s.manager.apply_bundle(face_variant(tmp_path / "variants", keys / "stranger.key", version="1.0.3"))
    assert (outcome.status, outcome.reason) == (Status.FAILED, Reason.UNTRUSTED_KEY), outcome.message
    assert s.slot.active.ref.name == "mnist-int8"
    s.assert_no_frame_lost()


def test_a_face_model_below_its_golden_gate_is_refused(serving, tmp_path, keys):
    s = serving()
    (tmp_path / "variants").mkdir()
    bundle = face_variant(tmp_path / "variants", keys / "trusted.key", golden_shift=0.6, version="1.0.1")  # true boxes moved by 0.6 of their width
    outcome = s.manager.apply_bundle(bundle)
    assert (outcome.status, outcome.reason) == (Status.FAILED, Reason.GOLDEN_ACCURACY), outcome.message
    assert "golden recall at IoU 0.5" in outcome.message
    s.wait_frames(3)
    assert s.slot.active.ref.version == SERVING and s.slot.active.ref.name == "mnist-int8"
    s.assert_no_frame_lost()


def test_a_face_model_that_gives_nan_while_serving_is_rolled_back_without_losing_a_frame(serving, tmp_path, keys):
    s = serving()
    # No golden gate (the operator set none): only the health window can catch it.
    (tmp_path / "variants").mkdir()
    bundle = face_variant(tmp_path / "variants", keys / "trusted.key", model=DATA / "detection-nan.tflite", version="1.0.2", min_golden_recall=0.0, min_golden_precision=0.0)
    outcome = s.manager.apply_bundle(bundle)
    assert (outcome.status, outcome.reason) == (Status.FAILED, Reason.HEALTH_CHECK_FAILED), outcome.message
    assert "NaN" in outcome.message and "rolled back" in outcome.message
    s.wait_frames(3)
    assert s.slot.active.ref.name == "mnist-int8" and s.manager.store.state().active is None
    s.assert_no_frame_lost()
