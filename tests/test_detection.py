"""Detection on real parts: MediaPipe's anchors and suppression, TFLite's own detection post-processing op,
and the shipped face bundle through `edge-agent infer` and `run` as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from bundle_helpers import test_key  # noqa: F401 (fixture)
from conftest import REPO, run_cli

from agent.bundles.bundle import SsdAnchors, open_bundle
from agent.errors import ModelError, Reason
from agent.fleet.packing import sign_bundle, write_manifest
from agent.inference.model import load_model
from agent.inference.tasks.boxes import Candidates, iou, match, suppress
from agent.inference.tasks.detection import golden_images, xywh_to_corners
from agent.inference.tasks.ssd import ssd_anchors
from agent.settings import ModelSettings, TaskSettings

FACE_BUNDLE = REPO / "models" / "face" / "bundle"
FACE_CLIP = REPO / "models" / "face" / "sample" / "faces.avi"
FACE_TRUTH = REPO / "models" / "face" / "sample" / "truth.json"
DATA = Path(__file__).resolve().parent / "data"
GOLDEN_NAMES = ["astronaut", "camera", "coffee", "chelsea", "text"]  # the first golden images: the photographs
WITH_FACES = {"astronaut", "camera"}
CLIP_THRESHOLD = 0.6


def overlap(box: dict, truth) -> float:
    mine = np.array([box["x"], box["y"], box["x"] + box["w"], box["y"] + box["h"]], np.float32)
    return float(iou(mine, xywh_to_corners(np.array([truth], np.float32)))[0])


# -- anchors, suppression, matching -----------------------------------------------------------------


def test_blazeface_anchors_are_made_as_mediapipe_makes_them():
    options = json.loads((FACE_BUNDLE / "manifest.json").read_text())["decoding"]["anchors"]
    anchors = ssd_anchors(SsdAnchors(**options))
    assert anchors.shape == (896, 4)  # 16 x 16 cells x 2 (stride 8) + 8 x 8 cells x 6 (three stride-16 layers merged)
    assert np.allclose(anchors[:2], [[0.5 / 16, 0.5 / 16, 1, 1]] * 2)
    assert np.allclose(anchors[2], [1.5 / 16, 0.5 / 16, 1, 1])
    assert np.allclose(anchors[512:518], [[0.5 / 8, 0.5 / 8, 1, 1]] * 6) and np.allclose(anchors[518], [1.5 / 8, 0.5 / 8, 1, 1])
    sized = ssd_anchors(SsdAnchors(**{**options, "fixed_anchor_size": False}))
    assert np.allclose(sized[0, 2:], [0.1484375] * 2) and np.allclose(sized[1, 2:], [np.sqrt(0.1484375 * (0.1484375 + (0.75 - 0.1484375) / 3))] * 2)


def _candidates(boxes, scores, classes, keypoints=None) -> Candidates:
    boxes = np.array(boxes, np.float32)
    points = np.array(keypoints, np.float32) if keypoints is not None else np.zeros((len(boxes), 0, 2), np.float32)
    return Candidates(boxes, np.array(scores, np.float32), np.array(classes), points)


def test_weighted_suppression_merges_the_candidates_of_one_object_and_keeps_the_others():
    found = _candidates(
        [[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]],
        [0.9, 0.3, 0.8, 0.7],
        [0, 0, 1, 0],  # the third is another class in the same place
        [[[2, 2]], [[5, 2]], [[0, 0]], [[55, 55]]],
    )
    weighted = suppress(found, 0.3, weighted=True)
    assert list(weighted.scores) == pytest.approx([0.9, 0.8, 0.7]) and list(weighted.classes) == [0, 1, 0]
    assert weighted.boxes[0] == pytest.approx([0.25, 0, 10.25, 10])  # (0.9 * 0 + 0.3 * 1) / 1.2
    assert weighted.keypoints[0, 0] == pytest.approx([2.75, 2])
    hard = suppress(found, 0.3, weighted=False)
    assert hard.boxes[0] == pytest.approx([0, 0, 10, 10]) and len(hard) == 3
    apart = suppress(found, 0.95, weighted=True)  # nothing overlaps that much: nothing merged
    assert len(apart) == 4


def test_matching_counts_each_true_box_once_and_only_within_its_class():
    truth = xywh_to_corners(np.array([[0, 0, 10, 10], [100, 100, 10, 10]], np.float32))
    found = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [100, 100, 110, 110]], np.float32)
    counted = match(found, np.array([0.9, 0.8, 0.7]), np.array([0, 0, 1]), truth, np.array([0, 0]))
    assert (counted.true_positives, counted.false_positives, counted.false_negatives) == (1, 2, 1)


# -- TFLite's detection post-processing op, in a bundle built here --------------------------------------


def bright_square_frame(x: int, y: int, size: int = 16, shape=(96, 128)) -> np.ndarray:
    frame = np.zeros((*shape, 3), np.uint8)
    frame[y : y + size, x : x + size] = 255
    return frame


def postprocess_bundle(folder: Path, key: Path | None, truth_shift: int = 0) -> Path:
    """A detection bundle around tests/data/detection-postprocess.tflite (see make_detection_models.py),
    its outputs described in the order the model has them."""
    folder.mkdir(parents=True)
    shutil.copyfile(DATA / "detection-postprocess.tflite", folder / "model.tflite")
    (folder / "labels.txt").write_text("bright\n")
    images = [bright_square_frame(80, 32), bright_square_frame(16, 48), np.zeros((96, 128, 3), np.uint8)]
    encoded = [cv2.imencode(".png", image)[1].reshape(-1) for image in images]
    np.savez(
        folder / "golden.npz",
        images=np.concatenate(encoded),
        image_ends=np.cumsum([len(e) for e in encoded]),
        boxes=np.array([[80 + truth_shift, 32, 16, 16], [16 + truth_shift, 48, 16, 16]], np.float32),
        box_images=np.array([0, 1]),
        box_labels=np.array([0, 0]),
    )
    float_spec = {"dtype": "float32", "scale": 0.0, "zero_point": 0}
    write_manifest(folder, {
        "name": "bright-squares", "version": "1.0.0", "task": "detection",
        "input": {"shape": [1, 64, 64, 3], **float_spec, "colour": "bgr", "fit": "letterbox", "mean": [0.0], "std": [255.0]},
        "outputs": [
            {"shape": [1, 10], **float_spec, "role": "classes"},
            {"shape": [1], **float_spec, "role": "count"},
            {"shape": [1, 10, 4], **float_spec, "role": "boxes"},
            {"shape": [1, 10], **float_spec, "role": "scores"},
        ],
        "decoding": {"type": "tflite-postprocess"},
        "labels": ["bright"],
        "metrics": {"golden_recall": 1.0, "golden_precision": 1.0, "size_bytes": 3876, "invoke_p50_us": 10.0},
        "min_golden_recall": 1.0, "min_golden_precision": 1.0,
        "provenance": {"program_sha256": "0" * 64, "data_sha256": "0" * 64, "libraries": {}, "created": "2026-12-01T00:00:00Z"},
    })
    if key is not None:
        sign_bundle(folder, key)
    return folder


def test_a_model_ending_in_tflites_detection_op_finds_boxes_in_frame_pixels(tmp_path, test_key):
    bundle = postprocess_bundle(tmp_path / "b", test_key[0])
    model = load_model(bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    # A 128 x 96 frame is letterboxed into 64 x 64 (scale 0.5, 8 rows of padding on top and below), so the
    # 16-pixel square at (80, 32) fills the anchor cell of row 3, column 5: the op's box is that cell.
    predictions = model.infer(bright_square_frame(80, 32), 0.5).predictions
    assert [(p.label, p.score, p.box.model_dump(), p.keypoints) for p in predictions] == [("bright", 1.0, {"x": 80, "y": 32, "w": 16, "h": 16}, None)]
    assert model.infer(np.zeros((96, 128), np.uint8), 0.5).predictions == []  # a grey frame is read too
    score = model.check_golden()
    assert (score.value, score.passed) == (1.0, True)


def test_the_golden_gate_refuses_a_detector_that_misses_its_golden_boxes(tmp_path, test_key):
    bundle = postprocess_bundle(tmp_path / "b", test_key[0], truth_shift=10)  # the true boxes moved 10 px: IoU 0.23
    model = load_model(bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    with pytest.raises(ModelError) as refused:
        model.check_golden()
    assert refused.value.reason == Reason.GOLDEN_ACCURACY and "golden recall at IoU 0.5 0.0000 is below the bundle's minimum 1.0000" in str(refused.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda raw: raw["outputs"].reverse(), "model boxes output tensor is float32[1] scale 0 zero point 0 but the manifest says float32[1, 10, 4]"),
        (lambda raw: raw["outputs"][1].update(role="scores"), "tflite-postprocess decoding needs outputs boxes, classes, scores, count once each"),
        (lambda raw: raw["input"].update(colour="gray", shape=[1, 64, 64, 1]), "model input tensor is float32[1, 64, 64, 3]"),
    ],
)
def test_a_manifest_that_does_not_describe_the_model_is_refused_in_one_line(edit, needle, tmp_path, test_key):
    bundle = postprocess_bundle(tmp_path / "b", None)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw.pop("files")
    edit(raw)
    write_manifest(bundle, raw)
    sign_bundle(bundle, test_key[0])
    with pytest.raises(ModelError) as refused:
        load_model(bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    assert needle in str(refused.value) and "\n" not in str(refused.value)


# -- the shipped face bundle ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_golden():
    bundle = open_bundle(FACE_BUNDLE, trusted_keys=ModelSettings().trusted_keys)
    return bundle.golden, golden_images(bundle.golden)


def test_the_face_bundle_is_signed_by_the_development_key_and_meets_its_own_golden_gate():
    model = load_model(FACE_BUNDLE, ModelSettings(), TaskSettings())
    assert model.bundle.signer == "fb61c05f78792c69" and (model.manifest.name, model.manifest.task_id) == ("face-detection", "detection")
    count = model.task.score_golden(model.backend.run, model.manifest.score_threshold)
    assert (count.recall, count.precision) == (model.manifest.metrics.golden_recall, model.manifest.metrics.golden_precision) == (1.0, 1.0)
    assert model.check_golden().passed and (FACE_BUNDLE / "LICENSE").read_text().startswith("\n                                 Apache License")


def test_the_face_bundle_was_made_by_the_committed_program():
    from models.face.make_bundle import program_sha256
    from models.face.obtain import SHA256

    manifest = json.loads((FACE_BUNDLE / "manifest.json").read_text())
    assert manifest["provenance"]["program_sha256"] == program_sha256(), "models/face changed: remake the bundle (make face-bundle)"
    assert manifest["files"]["model.tflite"] == manifest["provenance"]["data_sha256"] == SHA256  # MediaPipe's file, unchanged


def test_infer_finds_the_faces_of_the_astronaut_and_the_cameraman_and_nothing_in_the_negatives(tmp_path, face_golden):
    golden, images = face_golden
    paths = []
    for index, name in enumerate(GOLDEN_NAMES):
        paths.append(tmp_path / f"{name}.png")
        cv2.imwrite(str(paths[-1]), images[index])
    done = run_cli("infer", "--model", FACE_BUNDLE, *paths)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [Path(r["source"]).stem for r in results] == GOLDEN_NAMES
    for index, (name, result) in enumerate(zip(GOLDEN_NAMES, results)):
        assert result["task"] == "detection" and result["model"]["name"] == "face-detection"
        if name not in WITH_FACES:
            assert result["predictions"] == [], f"{name}: found {result['predictions']}"
            continue
        (face,) = result["predictions"]
        (truth,) = golden["boxes"][golden["box_images"] == index]
        assert face["label"] == "face" and face["score"] >= 0.5 and overlap(face["box"], truth) >= 0.5, (name, face, truth)
        box = face["box"]
        names = [point["name"] for point in face["keypoints"]]
        assert names == ["right_eye", "left_eye", "nose_tip", "mouth_centre", "right_ear_tragion", "left_ear_tragion"]
        eyes_nose_mouth = face["keypoints"][:4]
        assert all(box["x"] <= p["x"] < box["x"] + box["w"] and box["y"] <= p["y"] < box["y"] + box["h"] for p in eyes_nose_mouth)


def test_run_on_the_face_clip_finds_every_face_and_nothing_else():
    """At the clip's threshold of 0.6 (`make demo-face`): at 0.5 BlazeFace takes the cat's face for a face in
    one of its frames (0.53), as MediaPipe's own graph does (see models/face/MODEL_CARD.md)."""
    truth = json.loads(FACE_TRUTH.read_text())
    done = run_cli("run", "--model", FACE_BUNDLE, "--source", FACE_CLIP, "--threshold", str(CLIP_THRESHOLD))
    assert done.returncode == 0, done.stderr
    found = {r["frame"]: r["predictions"] for r in map(json.loads, done.stdout.splitlines()) if r["kind"] == "inference"}
    assert json.loads(done.stderr.strip().splitlines()[-1])["frames"] == truth["frame_count"]
    for frame in truth["frames"]:
        predictions = found.get(frame["frame"], [])
        boxes = [p["box"] for p in predictions]
        assert len(boxes) == len(frame["faces"]), f"frame {frame['frame']} ({frame['scene']}): {predictions}"
        for face in frame["faces"]:
            assert max(overlap(box, face) for box in boxes) >= 0.5, f"frame {frame['frame']} ({frame['scene']}): {face} not found in {boxes}"


def test_bench_measures_the_face_bundle_on_its_clip():
    """`edge-agent bench` as the model card quotes it (the figures are printed, not judged)."""
    done = run_cli("bench", "--model", FACE_BUNDLE, "--source", FACE_CLIP, "--seconds", "1", timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    print(json.dumps(figures))
    assert figures["invoke"]["p50"] > 0 and figures["invoke"]["backend"] == "litert"
    frames = json.loads(FACE_TRUTH.read_text())["frame_count"]
    assert figures["frame"]["n"] == 3 * frames and figures["frame"]["frame_size"] == [480, 360]
    assert figures["frame"]["max_predictions_per_frame"] == 2  # the two-faces scene (publishing at 0.5, the default)
    assert figures["paced_30fps"]["cpu_percent_of_one_core"] > 0 and figures["paced_30fps"]["start_to_first_result_s"] > 0
