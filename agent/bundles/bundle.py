"""Model bundles: what a device checks before it runs a model it was sent.

A bundle is a directory (or the same files in a .zip): `model.tflite`, `labels.txt`, `golden.npz`,
`manifest.json` and `manifest.sig`. The manifest says what the model is (task, tensor specs, labels,
metrics, provenance) and holds the sha256 of every other file; the Ed25519 signature covers the canonical
manifest bytes, so one signature vouches for every byte of the bundle. `open_bundle` refuses anything it
cannot vouch for with one ModelError line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from agent.bundles.signing import verify
from agent.errors import ModelError, Reason
from agent.settings import ModelSettings

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL_FILE = "model.tflite"
LABELS_FILE = "labels.txt"
GOLDEN_FILE = "golden.npz"
REQUIRED_FILES = (MODEL_FILE, LABELS_FILE, GOLDEN_FILE)
MAX_BUNDLE_BYTES = ModelSettings().max_bundle_bytes  # devices apply model.max_bundle_mb; this is its default

SHA256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"


def _utc(value: datetime) -> datetime:
    if value.utcoffset() is None or value.utcoffset().total_seconds() != 0:
        raise ValueError("must be UTC, e.g. 2026-01-31T12:00:00Z")
    return value


class Strict(BaseModel):
    """Manifest parts: unknown keys are errors (a typo must not silently drop a check)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OutputSpec(Strict):
    shape: tuple[int, ...]
    dtype: Literal["int8", "uint8", "float32"]
    scale: float = Field(ge=0)
    zero_point: int


class InputSpec(OutputSpec):
    layout: Literal["NHWC"] = "NHWC"
    colour: Literal["gray", "rgb"]
    # How a frame becomes this tensor: for classifiers, the id of the task that serves it (agent.inference.tasks).
    preprocessing: str


class Metrics(Strict):
    """Measured when the bundle was made (accuracies are fractions of the MNIST test set, 0..1)."""

    float_accuracy: float = Field(ge=0, le=1)
    int8_accuracy: float = Field(ge=0, le=1)
    size_bytes: int = Field(gt=0)
    invoke_p50_us: float = Field(gt=0)


class Provenance(Strict):
    program_sha256: SHA256 = Field(description="sha256 of the training program's source files")
    data_sha256: SHA256 = Field(description="sha256 of the training data file")
    libraries: dict[str, str] = Field(description="package -> version used to train and convert")
    created: Annotated[datetime, AfterValidator(_utc)]


def _arrays(golden: dict[str, np.ndarray], where: str, **wanted: str) -> dict[str, np.ndarray]:
    """The golden arrays named in `wanted` (name -> dtype kind, "u" or "i" or "f"), or a ModelError."""
    for name, kinds in wanted.items():
        if name not in golden or golden[name].dtype.kind not in kinds:
            raise ModelError(f"{where}: {GOLDEN_FILE} has no {name} array of kind {kinds!r} (it holds {', '.join(sorted(golden)) or 'nothing'}); re-pack the bundle")
    return golden


class ManifestBase(Strict):
    """Fields every task shares; each task adds its input, outputs, metrics and golden-set minimums."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(pattern=SEMVER)
    files: dict[str, SHA256] = Field(description="relative path -> sha256 of every file but manifest.json/.sig")
    labels: list[str] = Field(min_length=1)
    provenance: Provenance

    def check_golden(self, golden: dict[str, np.ndarray], where: str) -> None:
        """Refuse a golden.npz whose arrays this manifest's task cannot score (ModelError)."""
        raise NotImplementedError


class ClassificationManifest(ManifestBase):
    task: Literal["classification"] = "classification"
    input: InputSpec
    output: OutputSpec
    metrics: Metrics
    min_golden_accuracy: float = Field(ge=0, le=1, description="the device refuses the model below this on golden.npz")

    @property
    def task_id(self) -> str:
        """The task that serves this model: a classifier's preprocessing names it (mnist-digits)."""
        return self.input.preprocessing

    def check_golden(self, golden: dict[str, np.ndarray], where: str) -> None:
        """x: uint8 images already in the input's form (N, H, W[, C]); y: their label indices (N,)."""
        x, y = golden.get("x"), golden.get("y")
        image_shape = tuple(self.input.shape[1:])
        if self.input.colour == "gray" and image_shape[-1:] == (1,):
            image_shape = image_shape[:-1]
        if x is None or y is None or x.dtype != np.uint8 or x.shape[1:] != image_shape or y.shape != (len(x),) or len(x) == 0:
            held = f"x {x.dtype}{x.shape} and y {y.shape}" if x is not None and y is not None else f"arrays {', '.join(sorted(golden))}"
            raise ModelError(f"{where}: {GOLDEN_FILE} holds {held}; expected uint8 (N, {', '.join(map(str, image_shape))}) and (N,)")


class DetectorInput(OutputSpec):
    """The detector's image input and how a frame becomes it: fitted to the input size (letterbox keeps the
    aspect ratio and pads with zeros, stretch does not), put in the colour order the model was trained on,
    then (pixel - mean) / std per channel, then the tensor's own quantization."""

    layout: Literal["NHWC"] = "NHWC"
    colour: Literal["rgb", "bgr", "gray"]
    fit: Literal["letterbox", "stretch"]
    mean: list[float] = Field(min_length=1, max_length=3)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, max_length=3)


class DetectorOutput(OutputSpec):
    """One output tensor of the model, in the order the model has them, and what it holds."""

    role: Literal["boxes", "scores", "classes", "count"]


class SsdAnchors(Strict):
    """Anchors as MediaPipe's SsdAnchorsCalculatorOptions describe them (same names, same meaning)."""

    num_layers: int = Field(ge=1)
    min_scale: float = Field(gt=0)
    max_scale: float = Field(gt=0)
    input_size_height: int = Field(ge=1)
    input_size_width: int = Field(ge=1)
    anchor_offset_x: float = 0.5
    anchor_offset_y: float = 0.5
    strides: list[int] = Field(default_factory=list)
    feature_map_height: list[int] = Field(default_factory=list)
    feature_map_width: list[int] = Field(default_factory=list)
    aspect_ratios: list[float] = Field(default_factory=list)
    reduce_boxes_in_lowest_layer: bool = False
    interpolated_scale_aspect_ratio: float = 1.0
    fixed_anchor_size: bool = False


class SsdDecoding(Strict):
    """Raw box regressors and class scores decoded against SSD anchors, as MediaPipe's
    TensorsToDetectionsCalculatorOptions describe them (BlazeFace and its family)."""

    type: Literal["ssd-anchors"] = "ssd-anchors"
    anchors: SsdAnchors
    num_coords: int = Field(ge=4)
    box_coord_offset: int = Field(0, ge=0)
    keypoint_coord_offset: int = Field(4, ge=0)
    num_keypoints: int = Field(0, ge=0)
    num_values_per_keypoint: int = Field(2, ge=2)
    x_scale: float = Field(gt=0)
    y_scale: float = Field(gt=0)
    w_scale: float = Field(gt=0)
    h_scale: float = Field(gt=0)
    apply_exponential_on_box_size: bool = False
    reverse_output_order: bool = False
    sigmoid_score: bool = True
    score_clipping_thresh: float | None = Field(None, gt=0)


class PostprocessDecoding(Strict):
    """Detections already made by the model's TFLite_Detection_PostProcess op (TF Object Detection API,
    Model Maker EfficientDet-Lite): boxes [1, N, 4] as normalized ymin, xmin, ymax, xmax, classes [1, N],
    scores [1, N], count [1]. A class number plus label_offset is its index in labels."""

    type: Literal["tflite-postprocess"] = "tflite-postprocess"
    label_offset: int = 0


class GflDecoding(Strict):
    """Anchor-free outputs decoded as Generalized Focal Loss heads (NanoDet) decode them: every cell of each
    level's grid (input size / stride, row by row, level by level) is one anchor point at
    ((column, row) + center_offset) * stride input pixels; `scores` [1, N, classes] are its class scores (0..1) and
    `boxes` [1, N, 4 * (reg_max + 1)] its distances to the left, top, right and bottom edges, each a
    distribution over 0..reg_max strides whose expectation (softmax, then the mean) is the distance."""

    type: Literal["gfl-distance"] = "gfl-distance"
    strides: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    reg_max: int = Field(ge=1)
    input_size_height: int = Field(ge=1)
    input_size_width: int = Field(ge=1)
    center_offset: float = Field(0.5, ge=0, le=1)


class DetectionMetrics(Strict):
    """Measured on the golden set when the bundle was made: recall and precision at IoU 0.5, 0..1."""

    golden_recall: float = Field(ge=0, le=1)
    golden_precision: float = Field(ge=0, le=1)
    reference_recall: float | None = Field(None, ge=0, le=1, description="the model this one was made from (e.g. the float original of an int8 model)")
    reference_precision: float | None = Field(None, ge=0, le=1)
    size_bytes: int = Field(gt=0)
    invoke_p50_us: float = Field(gt=0)


class DetectionManifest(ManifestBase):
    """A detector: a frame in, boxes (and keypoints) with labels and scores out.

    Golden set (golden.npz): `images`, encoded images (PNG/JPEG) end to end as one uint8 array, `image_ends`
    the end offset of each; `boxes` float (M, 4) x, y, w, h in image pixels, `box_images` the image each box
    is in, `box_labels` its label index. An image with no box is a negative: anything found there is false.
    """

    task: Literal["detection"] = "detection"
    input: DetectorInput
    outputs: list[DetectorOutput] = Field(min_length=1)
    decoding: Annotated[SsdDecoding | PostprocessDecoding | GflDecoding, Field(discriminator="type")]
    keypoints: list[str] = Field(default_factory=list, description="names of each detection's keypoints, in the model's order")
    metrics: DetectionMetrics
    score_threshold: float = Field(0.5, gt=0, le=1, description="the score at which golden recall and precision are measured (devices publish at model.score_threshold)")
    min_golden_recall: float = Field(ge=0, le=1, description="the device refuses the model below this recall at IoU 0.5 on golden.npz")
    min_golden_precision: float = Field(ge=0, le=1, description="the device refuses the model below this precision at IoU 0.5 on golden.npz")

    @property
    def task_id(self) -> str:
        return "detection"

    def check_golden(self, golden: dict[str, np.ndarray], where: str) -> None:
        _arrays(golden, where, images="u", image_ends="iu", boxes="f", box_images="iu", box_labels="iu")
        images, ends, boxes = golden["images"], golden["image_ends"], golden["boxes"]
        count = len(golden["box_images"])
        consistent = (
            images.ndim == 1 and ends.ndim == 1 and len(ends) > 0 and int(ends[-1]) == len(images) and bool(np.all(np.diff(ends) > 0)) and int(ends[0]) > 0
            and boxes.shape == (count, 4) and golden["box_labels"].shape == (count,)
            and bool(np.all((golden["box_images"] >= 0) & (golden["box_images"] < len(ends))))
            and bool(np.all((golden["box_labels"] >= 0) & (golden["box_labels"] < len(self.labels))))
        )
        if not consistent:
            raise ModelError(f"{where}: {GOLDEN_FILE} detection arrays do not fit together (image ends, boxes (M, 4), a box's image and label in range); re-pack the bundle")


# manifest `task` -> manifest model; each model's task_id names the task (agent.inference.tasks) that serves it.
MANIFEST_TYPES: dict[str, type[ManifestBase]] = {"classification": ClassificationManifest, "detection": DetectionManifest}


def canonical_bytes(raw: dict[str, Any]) -> bytes:
    """The bytes a signature covers: sorted keys, no whitespace, UTF-8."""
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
    return f"{key}: {first['msg']}{shown}"


def parse_manifest(raw: Any, where: str = MANIFEST) -> ManifestBase:
    """A decoded manifest.json -> the manifest model of its task, or a ModelError naming the bad field."""
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: manifest must be a JSON object; rebuild it with `edge-fleet model pack`")
    task = raw.get("task")
    if task not in MANIFEST_TYPES:
        raise ModelError(f"{where}: unknown task {task!r} (this agent knows: {', '.join(MANIFEST_TYPES)}); update the agent or fix the manifest")
    try:
        return MANIFEST_TYPES[task].model_validate(raw)
    except ValidationError as exc:
        raise ModelError(f"{where}: {_describe(exc)}; fix the manifest and re-pack") from None


def _bundle_files(root: Path, max_bytes: int, where: str) -> dict[str, Path]:
    """Every regular file under root by relative POSIX path; no symlinks, total size within max_bytes."""
    found: dict[str, Path] = {}
    total = 0
    for directory, subdirs, names in os.walk(root):
        for name in subdirs + names:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ModelError(f"{where}: {path.relative_to(root)} is a symlink; bundles hold regular files only")
            if stat.S_ISREG(mode):
                total += path.stat().st_size
                found[path.relative_to(root).as_posix()] = path
            elif not stat.S_ISDIR(mode):
                raise ModelError(f"{where}: {path.relative_to(root)} is not a regular file; bundles hold regular files only")
    if total > max_bytes:
        raise ModelError(f"{where}: bundle is {total} bytes, over the limit of {max_bytes}; raise model.max_bundle_mb or ship a smaller model")
    return found


def _safe_member(info: zipfile.ZipInfo, where: str) -> PurePosixPath:
    name = info.filename
    path = PurePosixPath(name)
    escapes = "\\" in name or path.is_absolute() or ".." in path.parts or (len(name) > 1 and name[1] == ":")
    if escapes or not path.parts:
        raise ModelError(f"{where}: zip entry {name!r} escapes the bundle directory; rebuild the zip with `edge-fleet model pack`")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ModelError(f"{where}: zip entry {name!r} is a symlink; bundles hold regular files only")
    return path


def extract_zip(zip_path: Path, dest: Path, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
    """Unpack a bundle .zip into dest, refusing path escapes, symlinks and anything over max_bytes."""
    where = str(zip_path)
    if zip_path.stat().st_size > max_bytes:
        raise ModelError(f"{where}: bundle is {zip_path.stat().st_size} bytes, over the limit of {max_bytes}; raise model.max_bundle_mb or ship a smaller model")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [(info, _safe_member(info, where)) for info in archive.infolist()]
            declared = sum(info.file_size for info, _ in members)
            if declared > max_bytes:
                raise ModelError(f"{where}: bundle unpacks to {declared} bytes, over the limit of {max_bytes}; raise model.max_bundle_mb or ship a smaller model")
            for info, member in members:
                target = dest.joinpath(*member.parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "xb") as out:
                    shutil.copyfileobj(source, out)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, FileExistsError) as exc:
        raise ModelError(f"{where}: not a readable bundle zip ({exc}); rebuild it with `edge-fleet model pack`") from None


@dataclass
class Bundle:
    """A bundle whose signature and file hashes have been checked. Its files are read from `root`."""

    root: Path
    manifest: ManifestBase
    signer: str | None  # key id of the trusted key that signed it; None when unsigned bundles are allowed
    golden: dict[str, np.ndarray]  # golden.npz's arrays, checked by the manifest's task
    _unpacked: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def model_sha256(self) -> str:
        return self.manifest.files[MODEL_FILE]

    @property
    def labels(self) -> list[str]:
        return self.manifest.labels

    @property
    def golden_x(self) -> np.ndarray:
        """A classifier's golden images, uint8 (N, H, W[, C]), already preprocessed."""
        return self.golden["x"]

    @property
    def golden_y(self) -> np.ndarray:
        """A classifier's golden labels (N,)."""
        return self.golden["y"].astype(np.int64)


def read_manifest(root: Path, where: str) -> tuple[dict[str, Any], bytes]:
    """manifest.json decoded, and its canonical bytes."""
    try:
        raw = json.loads((root / MANIFEST).read_bytes())
        return raw, canonical_bytes(raw)
    except FileNotFoundError:
        raise ModelError(f"{where}: no {MANIFEST}; build the bundle with `edge-fleet model pack`") from None
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{where}: {MANIFEST} is not valid JSON ({exc}); rebuild it with `edge-fleet model pack`") from None


def _check_files(manifest: ManifestBase, files: dict[str, Path], where: str) -> None:
    present = {name for name in files if name not in (MANIFEST, SIGNATURE)}
    for name in REQUIRED_FILES:
        if name not in manifest.files:
            raise ModelError(f"{where}: manifest lists no {name}; every bundle needs {', '.join(REQUIRED_FILES)}")
    for name, expected in sorted(manifest.files.items()):
        if name not in present:
            raise ModelError(f"{where}: {name} is listed in the manifest but missing from the bundle; re-pack it")
        if sha256_file(files[name]) != expected:
            raise ModelError(f"{where}: {name} does not match its sha256 in the manifest (tampered or corrupt); re-download the bundle")
    unlisted = sorted(present - set(manifest.files))
    if unlisted:
        raise ModelError(f"{where}: {unlisted[0]} is not listed in the manifest; re-pack the bundle")


def _read_golden(root: Path, manifest: ManifestBase, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(root / GOLDEN_FILE, allow_pickle=False) as golden:
            arrays = {name: golden[name] for name in golden.files}
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{where}: {GOLDEN_FILE} is not an .npz of plain arrays ({exc}); re-pack the bundle") from None
    manifest.check_golden(arrays, where)
    return arrays


def _read_labels(root: Path, manifest: ManifestBase, where: str) -> None:
    labels = (root / LABELS_FILE).read_text(encoding="utf-8").splitlines()
    if labels != list(manifest.labels):
        raise ModelError(f"{where}: {LABELS_FILE} does not match the manifest's labels; re-pack the bundle")


def open_bundle(
    path: Path,
    *,
    trusted_keys: Sequence[Path],
    require_signature: bool = True,
    max_bytes: int = MAX_BUNDLE_BYTES,
) -> Bundle:
    """Open a bundle directory or .zip and check it: size, paths, signature, manifest, every file's hash.

    A present manifest.sig is always verified (a bad signature is never ignored); `require_signature`
    decides only whether a bundle without one is refused.
    """
    path = Path(path)
    where = str(path)
    unpacked = None
    if path.is_dir():
        root = path
    elif path.is_file():
        unpacked = tempfile.TemporaryDirectory(prefix="edge-bundle-")
        root = Path(unpacked.name)
        extract_zip(path, root, max_bytes)
    else:
        raise ModelError(f"model bundle {where} not found; set model.bundle to a bundle directory or .zip")
    files = _bundle_files(root, max_bytes, where)
    raw, signed_bytes = read_manifest(root, where)
    signer = None
    if SIGNATURE in files:
        signer = verify(signed_bytes, files[SIGNATURE].read_bytes(), trusted_keys, where)
    elif require_signature:
        raise ModelError(f"{where}: bundle is not signed (no {SIGNATURE}); sign it with `edge-fleet model sign` or set model.require_signature=false for development", Reason.UNSIGNED)
    manifest = parse_manifest(raw, f"{where}: {MANIFEST}")
    _check_files(manifest, files, where)
    _read_labels(root, manifest, where)
    return Bundle(root=root, manifest=manifest, signer=signer, golden=_read_golden(root, manifest, where), _unpacked=unpacked)
