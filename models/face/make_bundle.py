"""Make the face-detection bundle: `python -m models.face.make_bundle --out models/face/bundle --key KEY`.

BlazeFace short-range (obtain.py) is shipped as the float original, or with --int8 rebuilt in TensorFlow and
quantized to int8 with a representative set (rebuild.py; see MODEL_CARD.md for why the shipped one is float). The golden set is scikit-image's photographs
and composites of them (scenes.py) with their true face boxes, stored as JPEG inside golden.npz so a device
(and the tests) need nothing else. Figures in the manifest are measured with the agent's own code: the
bundle is loaded, run and scored exactly as a device does before it serves it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

from agent.bundles.bundle import GOLDEN_FILE, LABELS_FILE, MANIFEST, MODEL_FILE, SIGNATURE
from agent.errors import AgentError
from agent.fleet.packing import sign_bundle, write_manifest
from agent.inference.backends.base import TensorSpec
from agent.inference.evaluate import invoke_latency_us
from agent.inference.model import load_model
from agent.inference.tasks.detection import DetectionTask, ImageFitter
from agent.settings import ModelSettings, TaskSettings
from models.face import obtain, scenes
from models.mnist.train import created_time

PROGRAM_DIR = Path(__file__).resolve().parent
LICENSE_FILE = "LICENSE"
LABELS = ["face"]
KEYPOINTS = ["right_eye", "left_eye", "nose_tip", "mouth_centre", "right_ear_tragion", "left_ear_tragion"]
LIBRARIES = ("tensorflow-cpu", "numpy", "opencv-python-headless", "ai-edge-litert", "scikit-image")
APACHE_LICENSE = Path("/usr/share/common-licenses/Apache-2.0")
# MediaPipe's face_detection_short_range graph options (face_detection.pbtxt and its short-range subgraph).
INPUT = {"layout": "NHWC", "colour": "rgb", "fit": "letterbox", "mean": [127.5], "std": [127.5]}
DECODING = {
    "type": "ssd-anchors",
    "anchors": {
        "num_layers": 4, "min_scale": 0.1484375, "max_scale": 0.75, "input_size_height": 128, "input_size_width": 128,
        "anchor_offset_x": 0.5, "anchor_offset_y": 0.5, "strides": [8, 16, 16, 16], "aspect_ratios": [1.0],
        "interpolated_scale_aspect_ratio": 1.0, "fixed_anchor_size": True,
    },
    "num_coords": 16, "box_coord_offset": 0, "keypoint_coord_offset": 4, "num_keypoints": 6, "num_values_per_keypoint": 2,
    "x_scale": 128.0, "y_scale": 128.0, "w_scale": 128.0, "h_scale": 128.0,
    "reverse_output_order": True, "sigmoid_score": True, "score_clipping_thresh": 100.0,
}

# What the int8 rebuild clips its outputs to. Scores: logits beyond +-16 are sigmoid 1e-7 from 0 or 1, so no
# threshold decision changes, and the 256 int8 steps are 0.125 logit apart. Regressors (pixels of the 128 x 128
# input): on the representative images, every anchor scoring above 0.007 has centre offsets within +-24, sizes
# within 12..125 and keypoint offsets within +-62, well inside the clip; steps are 1 pixel.
OUTPUT_RANGES = {"classificators": (-16.0, 16.0), "regressors": (-96.0, 160.0)}


def program_sha256() -> str:
    """sha256 over this program's source files (name and content, sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(PROGRAM_DIR.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def golden_arrays(quality: int) -> dict[str, np.ndarray]:
    """The golden scenes as JPEG bytes end to end, and their true boxes."""
    encoded, ends, boxes, owners = [], [], [], []
    for index, scene in enumerate(scenes.golden_scenes()):
        ok, data = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        encoded.append(data.reshape(-1))
        ends.append(sum(len(e) for e in encoded))
        boxes += scene.faces
        owners += [index] * len(scene.faces)
    return {
        "images": np.concatenate(encoded).astype(np.uint8),
        "image_ends": np.array(ends, np.int64),
        "boxes": np.array(boxes, np.float32).reshape(-1, 4),
        "box_images": np.array(owners, np.int64),
        "box_labels": np.zeros(len(owners), np.int64),
    }


def representative_images(count: int, seed: int) -> list[np.ndarray]:
    """Calibration inputs: crops of scikit-image photographs (faces and not), scaled and mirrored at random,
    made into the model's float input the way the agent makes frames into it."""
    fitter = ImageFitter(TensorSpec("input", (1, 128, 128, 3), "float32", 0.0, 0), INPUT["colour"], INPUT["fit"], INPUT["mean"], INPUT["std"])
    names = ["astronaut", "camera", "coffee", "chelsea", "text", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "moon", "coins", "page", "clock", "brick", "grass", "gravel", "retina", "cat"]
    photos = [scenes.photograph(name) for name in names] + [scene.image for scene in scenes.composites()]
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        fraction = rng.uniform(0.3, 1.0)
        ch, cw = max(16, int(h * fraction)), max(16, int(w * fraction))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = photo[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        images.append(fitter(np.ascontiguousarray(crop))[0][0])
    return images


def _tensor(spec: TensorSpec) -> dict:
    return {"shape": list(spec.shape), "dtype": spec.dtype, "scale": spec.scale, "zero_point": spec.zero_point}


def assemble(out: Path, model: bytes, golden: dict[str, np.ndarray], fields: dict) -> None:
    """Write every bundle file and an unsigned manifest (tensor specs read from the model itself)."""
    from agent.inference.backends.litert import LiteRtBackend

    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, LABELS_FILE, GOLDEN_FILE, LICENSE_FILE, MANIFEST, SIGNATURE):
        (out / name).unlink(missing_ok=True)
    (out / MODEL_FILE).write_bytes(model)
    (out / LABELS_FILE).write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    np.savez(out / GOLDEN_FILE, **golden)
    shutil.copyfile(APACHE_LICENSE, out / LICENSE_FILE)
    backend = LiteRtBackend(out / MODEL_FILE, None)
    roles = {16: "boxes", 1: "scores"}
    write_manifest(out, {
        **fields,
        "task": "detection",
        "input": {**_tensor(backend.inputs[0]), **INPUT},
        "outputs": [{**_tensor(spec), "role": roles[spec.shape[-1]]} for spec in backend.outputs],
        "decoding": DECODING,
        "keypoints": KEYPOINTS,
        "labels": LABELS,
    })


def measure(bundle: Path) -> tuple[float, float, float]:
    """Golden recall and precision at IoU 0.5, and invoke p50 (us), as a device measures them."""
    model = load_model(bundle, ModelSettings(require_signature=False), TaskSettings())
    task: DetectionTask = model.task
    count = task.score_golden(model.backend.run, model.manifest.score_threshold)
    frame = scenes.photograph("astronaut")
    p50, _ = invoke_latency_us(model.backend.run, task.prepare(frame).invokes[0], repeats=1000, warmup=100)
    return count.recall, count.precision, p50


def build_bundle(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="face-bundle-") as tmp:
        work = Path(tmp)
        original = obtain.obtain(args.original or work / "face_detection_short_range.tflite")
        golden = golden_arrays(args.jpeg_quality)
        fields = {
            "schema_version": 1,
            "name": args.name,
            "version": args.version,
            "provenance": {
                "program_sha256": program_sha256(),
                "data_sha256": obtain.SHA256,
                "libraries": {name: importlib.metadata.version(name) for name in LIBRARIES} | {"mediapipe": obtain.PACKAGE.split("==")[1]},
                "created": created_time(),
            },
        }
        placeholder = {"metrics": {"golden_recall": 0, "golden_precision": 0, "size_bytes": 1, "invoke_p50_us": 1}, "min_golden_recall": 0, "min_golden_precision": 0}
        reference = work / "float"
        assemble(reference, original.read_bytes(), golden, {**fields, **placeholder})
        float_recall, float_precision, float_p50 = measure(reference)
        print(f"float original: golden recall {float_recall:.3f} precision {float_precision:.3f}, invoke p50 {float_p50:.0f} us, {original.stat().st_size} bytes")
        if not args.int8:
            model = original.read_bytes()
        else:
            from models.face.rebuild import rebuild, to_tflite

            run, shape, _ = rebuild(original, OUTPUT_RANGES)
            model = to_tflite(run, shape, representative_images(args.calibration_images, args.seed))
        out = Path(args.out)
        assemble(out, model, golden, {**fields, **placeholder})
        recall, precision, p50 = measure(out)
        metrics = {"golden_recall": recall, "golden_precision": precision, "size_bytes": len(model), "invoke_p50_us": round(p50, 1)}
        if args.int8:
            metrics |= {"reference_recall": float_recall, "reference_precision": float_precision}
        floor = lambda value: max(0.0, round(np.floor((value - args.golden_margin) * 100) / 100, 2))  # noqa: E731
        assemble(out, model, golden, {**fields, "metrics": metrics, "min_golden_recall": floor(recall), "min_golden_precision": floor(precision)})
    signer = sign_bundle(out, args.key) if args.key else None
    kind = "int8" if args.int8 else "float"
    print(f"{kind}: golden recall {recall:.3f} precision {precision:.3f}, invoke p50 {p50:.0f} us, {len(model)} bytes; bundle {out} " + (f"signed by key {signer}" if signer else "UNSIGNED"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.face.make_bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROGRAM_DIR / "bundle", help="bundle directory to (re)write")
    parser.add_argument("--key", type=Path, help="Ed25519 private key to sign with (unsigned without)")
    parser.add_argument("--original", type=Path, help="where to keep the obtained float model (default: a temporary file)")
    parser.add_argument("--int8", action="store_true", help="ship the int8 rebuild instead of the float original (needs the train extra)")
    parser.add_argument("--name", default="face-detection")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--calibration-images", type=int, default=1000, help="representative images for --int8")
    parser.add_argument("--jpeg-quality", type=int, default=80, help="of the golden images stored in golden.npz")
    parser.add_argument("--golden-margin", type=float, default=0.1, help="golden minimums = measured minus this")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        build_bundle(parse_args(argv))
    except (AgentError, obtain.ObtainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
