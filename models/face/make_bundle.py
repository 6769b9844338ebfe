"""Make the face-detection bundle: `python -m models.face.make_bundle --out models/face/bundle --key KEY`.

BlazeFace short-range (obtain.py) is shipped as the float original, or with --int8 rebuilt in TensorFlow and
quantized to int8 with a representative set (rebuild.py; see MODEL_CARD.md for why the shipped one is float). The golden set is scikit-image's photographs
and composites of them (scenes.py) with their true face boxes, stored as JPEG inside golden.npz so a device
(and the tests) need nothing else. Figures in the manifest are measured with the agent's own code: the
bundle is loaded, run and scored exactly as a device does before it serves it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.fleet.packing import sign_bundle
from models import detector_bundle as shared
from models.face import obtain, scenes
from models.mnist.train import created_time

PROGRAM_DIR = Path(__file__).resolve().parent
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
ROLES = {16: "boxes", 1: "scores"}  # output role by its last dimension

# What the int8 rebuild clips its outputs to. Scores: logits beyond +-16 are sigmoid 1e-7 from 0 or 1, so no
# threshold decision changes, and the 256 int8 steps are 0.125 logit apart. Regressors (pixels of the 128 x 128
# input): on the representative images, every anchor scoring above 0.007 has centre offsets within +-24, sizes
# within 12..125 and keypoint offsets within +-62, well inside the clip; steps are 1 pixel.
OUTPUT_RANGES = {"classificators": (-16.0, 16.0), "regressors": (-96.0, 160.0)}


def program_sha256() -> str:
    """sha256 over this program's source files and the detector programs' shared module."""
    return shared.program_sha256(PROGRAM_DIR)


def golden_arrays(quality: int) -> dict[str, np.ndarray]:
    """The golden scenes as JPEG bytes end to end, and their true boxes."""
    golden = scenes.golden_scenes()
    return shared.golden_arrays([scene.image for scene in golden], [scene.faces for scene in golden], [[0] * len(scene.faces) for scene in golden], quality)


def representative_images(count: int, seed: int) -> list[np.ndarray]:
    """Calibration inputs: crops of scikit-image photographs (faces and not) and the composites."""
    names = ["astronaut", "camera", "coffee", "chelsea", "text", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel", "moon", "coins", "page", "clock", "brick", "grass", "gravel", "retina", "cat"]
    photos = [shared.photograph(name) for name in names] + [scene.image for scene in scenes.composites()]
    return shared.representative_images(photos, shared.float_fitter((1, 128, 128, 3), INPUT), count, seed)


def assemble(out: Path, model: bytes, golden: dict[str, np.ndarray], fields: dict) -> None:
    """Write every bundle file and an unsigned manifest (tensor specs read from the model itself)."""
    texts = {shared.LICENSE_FILE: APACHE_LICENSE.read_text(encoding="utf-8")}
    shared.assemble(out, model, LABELS, golden, texts, {**fields, "input": INPUT, "decoding": DECODING, "keypoints": KEYPOINTS}, ROLES)


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
        placeholder = shared.UNMEASURED
        reference = work / "float"
        assemble(reference, original.read_bytes(), golden, {**fields, **placeholder})
        frame = scenes.photograph("astronaut")
        float_recall, float_precision, float_p50 = shared.measure(reference, frame)
        print(f"float original: golden recall {float_recall:.3f} precision {float_precision:.3f}, invoke p50 {float_p50:.0f} us, {original.stat().st_size} bytes")
        if not args.int8:
            model = original.read_bytes()
        else:
            from models.face.rebuild import rebuild, to_tflite

            run, shape, _ = rebuild(original, OUTPUT_RANGES)
            model = to_tflite(run, shape, representative_images(args.calibration_images, args.seed))
        out = Path(args.out)
        assemble(out, model, golden, {**fields, **placeholder})
        recall, precision, p50 = shared.measure(out, frame)
        metrics = {"golden_recall": recall, "golden_precision": precision, "size_bytes": len(model), "invoke_p50_us": round(p50, 1)}
        if args.int8:
            metrics |= {"reference_recall": float_recall, "reference_precision": float_precision}
        minimums = {"min_golden_recall": shared.golden_minimum(recall, args.golden_margin), "min_golden_precision": shared.golden_minimum(precision, args.golden_margin)}
        assemble(out, model, golden, {**fields, "metrics": metrics, **minimums})
    signer = sign_bundle(out, args.key) if args.key else None
    kind = "int8" if args.int8 else "float"
    print(f"{kind}: golden recall {recall:.3f} precision {precision:.3f}, invoke p50 {p50:.0f} us, {len(model)} bytes; bundle {out} " + (f"signed by key {signer}" if signer else "UNSIGNED"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = shared.bundle_arguments("python -m models.face.make_bundle", __doc__.splitlines()[0], PROGRAM_DIR, "face-detection", 20261202, 1000, 80, "where to keep the obtained float model (default: a temporary file)")
    parser.add_argument("--int8", action="store_true", help="ship the int8 rebuild instead of the float original (needs the train extra)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return shared.command(build_bundle, parse_args(argv), (AgentError, obtain.ObtainError))


if __name__ == "__main__":
    raise SystemExit(main())
