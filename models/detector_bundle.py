"""What the detector bundles' programs share (models/face, models/coco): scikit-image's photographs, the
golden set's arrays, calibration crops, writing the bundle's files and measuring it as a device does.

Needs the `face` extra (scikit-image) for the photographs; the agent never imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from agent.bundles.bundle import GOLDEN_FILE, LABELS_FILE, MANIFEST, MODEL_FILE, SIGNATURE
from agent.fleet.packing import write_manifest
from agent.inference.backends.base import TensorSpec
from agent.inference.evaluate import invoke_latency_us
from agent.inference.model import load_model
from agent.inference.tasks.detection import DetectionTask, ImageFitter
from agent.settings import LiteRtSettings, ModelSettings, TaskSettings

LICENSE_FILE = "LICENSE"
NOTICE_FILE = "NOTICE"
# What a bundle's manifest says before it has been measured (write_manifest validates every field).
UNMEASURED = {"metrics": {"golden_recall": 0, "golden_precision": 0, "size_bytes": 1, "invoke_p50_us": 1}, "min_golden_recall": 0, "min_golden_precision": 0}


def program_sha256(folder: Path) -> str:
    """sha256 over a program's source files (name and content, sorted by name), this module's included."""
    digest = hashlib.sha256()
    for path in sorted([*Path(folder).glob("*.py"), Path(__file__)], key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def photograph(name: str) -> np.ndarray:
    """One of scikit-image's bundled images as a BGR frame (the cameraman is `camera` there)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: the left view
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


def golden_arrays(images: list[np.ndarray], boxes: list[list[tuple[float, float, float, float]]], labels: list[list[int]], quality: int) -> dict[str, np.ndarray]:
    """golden.npz's arrays: the images as JPEG end to end, and each image's true boxes (x, y, w, h) and labels."""
    encoded, ends, owners = [], [], []
    for index, image in enumerate(images):
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        encoded.append(data.reshape(-1))
        ends.append(sum(len(e) for e in encoded))
        owners += [index] * len(boxes[index])
    return {
        "images": np.concatenate(encoded).astype(np.uint8),
        "image_ends": np.array(ends, np.int64),
        "boxes": np.array([box for image_boxes in boxes for box in image_boxes], np.float32).reshape(-1, 4),
        "box_images": np.array(owners, np.int64),
        "box_labels": np.array([label for image_labels in labels for label in image_labels], np.int64),
    }


def representative_images(photos: list[np.ndarray], fitter: ImageFitter, count: int, seed: int) -> list[np.ndarray]:
    """Calibration inputs: random crops (30-100% of each side) of the photographs, mirrored half the time,
    made into the model's float input the way the agent makes frames into it."""
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


def float_fitter(shape: tuple[int, ...], manifest_input: dict) -> ImageFitter:
    """The agent's frame -> input conversion for a float input of `shape` described as in a manifest."""
    return ImageFitter(TensorSpec("input", shape, "float32", 0.0, 0), manifest_input["colour"], manifest_input["fit"], manifest_input["mean"], manifest_input["std"])


def tensor_fields(spec: TensorSpec) -> dict:
    return {"shape": list(spec.shape), "dtype": spec.dtype, "scale": spec.scale, "zero_point": spec.zero_point}


def assemble(out: Path, model: bytes, labels: list[str], golden: dict[str, np.ndarray], texts: dict[str, str], fields: dict, roles: dict[int, str]) -> None:
    """Write every bundle file (the model, labels, golden set and `texts` such as LICENSE) and an unsigned
    manifest: `fields` plus the tensor specs read from the model itself, each output's role found in `roles`
    by its last dimension."""
    from agent.inference.backends.litert import LiteRtBackend

    out.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, LABELS_FILE, GOLDEN_FILE, LICENSE_FILE, NOTICE_FILE, MANIFEST, SIGNATURE):
        (out / name).unlink(missing_ok=True)
    (out / MODEL_FILE).write_bytes(model)
    (out / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    np.savez(out / GOLDEN_FILE, **golden)
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    backend = LiteRtBackend(out / MODEL_FILE, LiteRtSettings())
    write_manifest(out, {
        **fields,
        "task": "detection",
        "input": {**tensor_fields(backend.inputs[0]), **fields["input"]},
        "outputs": [{**tensor_fields(spec), "role": roles[spec.shape[-1]]} for spec in backend.outputs],
        "labels": labels,
    })


def measure(bundle: Path, frame: np.ndarray) -> tuple[float, float, float]:
    """Golden recall and precision at IoU 0.5, and invoke p50 (us) on `frame`, as a device measures them."""
    model = load_model(bundle, ModelSettings(require_signature=False), TaskSettings())
    task: DetectionTask = model.task
    count = task.score_golden(model.backend.run, model.manifest.score_threshold)
    p50, _ = invoke_latency_us(model.backend.run, task.prepare(frame).invokes[0], repeats=1000, warmup=100)
    return count.recall, count.precision, p50


def golden_minimum(measured: float, margin: float) -> float:
    """The gate a device applies: the measured figure less the margin, rounded down to hundredths."""
    return max(0.0, round(np.floor((measured - margin) * 100) / 100, 2))


def bundle_arguments(prog: str, description: str, program_dir: Path, name: str, seed: int, calibration_images: int, jpeg_quality: int, original: str) -> argparse.ArgumentParser:
    """The options every detector bundle program takes (each adds its own)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, default=program_dir / "bundle", help="bundle directory to (re)write")
    parser.add_argument("--key", type=Path, help="Ed25519 private key to sign with (unsigned without)")
    parser.add_argument("--original", type=Path, help=original)
    parser.add_argument("--name", default=name)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--calibration-images", type=int, default=calibration_images, help="representative images for the int8 quantization")
    parser.add_argument("--jpeg-quality", type=int, default=jpeg_quality, help="of the golden images stored in golden.npz")
    parser.add_argument("--golden-margin", type=float, default=0.1, help="golden minimums = measured minus this")
    return parser


def command(action: Callable[[argparse.Namespace], object], args: argparse.Namespace, errors: tuple[type[Exception], ...]) -> int:
    """Run a program's action on its arguments: the errors it expects become one line on stderr, exit code 2."""
    try:
        action(args)
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
