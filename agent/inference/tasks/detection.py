"""`detection`: a neural detector run on the whole frame; boxes (and keypoints) with labels and scores.

The manifest says how a frame becomes the input (size, letterbox or stretch, colour order, mean/std, the
tensor's quantization) and how the outputs become detections: raw regressors and scores decoded against SSD
anchors (ssd.py), or distance distributions and scores at anchor points (gfl.py, NanoDet), each followed by
non-maximum suppression; or the boxes, classes, scores and count of a model that ends in TFLite's detection
post-processing op. Boxes and keypoints are mapped back to frame pixels.
Golden check: recall and precision at IoU 0.5 on the bundle's golden images.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from agent.bundles.bundle import Bundle, DetectionManifest, GflDecoding, SsdDecoding
from agent.errors import ModelError, Reason
from agent.inference.backends.base import TensorSpec
from agent.inference.tasks.base import GoldenScore, Prepared, Run, Task, check_tensor
from agent.inference.tasks.boxes import Candidates, match, suppress
from agent.inference.tasks.gfl import GflDecoder
from agent.inference.tasks.ssd import SsdDecoder
from agent.messages import Box, Keypoint, Prediction
from agent.settings import DetectionSettings

GOLDEN_IOU = 0.5
TO_MODEL_COLOUR = {  # (frame channels, model colour) -> OpenCV conversion; None: as it is
    (1, "rgb"): cv2.COLOR_GRAY2RGB,
    (1, "bgr"): cv2.COLOR_GRAY2BGR,
    (1, "gray"): None,
    (3, "rgb"): cv2.COLOR_BGR2RGB,
    (3, "bgr"): None,
    (3, "gray"): cv2.COLOR_BGR2GRAY,
}


@dataclass(frozen=True)
class Fit:
    """Where the frame went in the model's input: input = frame * scale + offset (per axis), in input pixels."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    width: int  # the frame's
    height: int

    def to_frame(self, points: np.ndarray, input_width: int, input_height: int) -> np.ndarray:
        """Normalized input coordinates (..., 2) as x, y -> frame pixels."""
        x = (points[..., 0] * input_width - self.offset_x) / self.scale_x
        y = (points[..., 1] * input_height - self.offset_y) / self.scale_y
        return np.stack([x, y], axis=-1)


class ImageFitter:
    """A frame -> the model's input tensor: colour order, size (letterbox or stretch), mean/std, quantization.

    The frame is warped into the input the way MediaPipe's ImageToTensorCalculator does it (corners to
    corners, bilinear, zero borders), so a MediaPipe model scores what it scores in MediaPipe: an
    area-averaging resize moved BlazeFace's score for the cat photograph from 0.45 to 0.50.
    """

    def __init__(self, spec: TensorSpec, colour: str, fit: str, mean: list[float], std: list[float]):
        self.spec = spec
        _, self.height, self.width, self.channels = spec.shape
        self.colour = colour
        self.letterbox = fit == "letterbox"
        self.gain, self.bias = 1.0 / np.asarray(std, np.float32), -np.asarray(mean, np.float32) / np.asarray(std, np.float32)

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, Fit]:
        height, width = image.shape[:2]
        conversion = TO_MODEL_COLOUR[(1 if image.ndim == 2 else image.shape[2], self.colour)]
        if conversion is not None:
            image = cv2.cvtColor(image, conversion)
        scale_x, scale_y = self.width / width, self.height / height
        if self.letterbox:
            scale_x = scale_y = min(scale_x, scale_y)
        offset_x, offset_y = (self.width - width * scale_x) / 2, (self.height - height * scale_y) / 2
        # The frame's edges go to the input's edges (bars: black), sampled bilinearly, as MediaPipe samples.
        matrix = np.float32([[scale_x, 0, offset_x], [0, scale_y, offset_y]])
        canvas = cv2.warpAffine(image, matrix, (self.width, self.height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        fit = Fit(scale_x, scale_y, offset_x, offset_y, width, height)
        values = canvas.reshape(1, self.height, self.width, self.channels).astype(np.float32) * self.gain + self.bias
        return self.spec.quantize(values), fit


class PostprocessDecoder:
    """The outputs of TFLite's detection post-processing op -> candidates in normalized input coordinates."""

    def __init__(self, label_offset: int):
        self.label_offset = label_offset

    def decode(self, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray, count: np.ndarray, score_threshold: float) -> Candidates:
        n = int(np.asarray(count).reshape(-1)[0])
        boxes, classes, scores = boxes.reshape(-1, 4)[:n], classes.reshape(-1)[:n], scores.reshape(-1)[:n]
        kept = scores >= score_threshold
        ymin, xmin, ymax, xmax = boxes[kept].T
        return Candidates(np.stack([xmin, ymin, xmax, ymax], axis=1).astype(np.float32), scores[kept].astype(np.float32), np.rint(classes[kept]).astype(np.int64) + self.label_offset, np.zeros((int(kept.sum()), 0, 2), np.float32))


class DetectionTask(Task):
    name = "detection"

    def __init__(self, bundle: Bundle, inputs: list[TensorSpec], outputs: list[TensorSpec], settings: DetectionSettings):
        where = str(bundle.root)
        manifest: DetectionManifest = bundle.manifest
        if len(inputs) != 1 or len(outputs) != len(manifest.outputs):
            raise ModelError(f"{where}: the manifest describes 1 input and {len(manifest.outputs)} outputs but the model has {len(inputs)} and {len(outputs)}; re-pack the bundle from this model", Reason.TENSOR_MISMATCH)
        check_tensor("input", manifest.input, inputs[0], where)
        for claimed, real in zip(manifest.outputs, outputs):
            check_tensor(f"{claimed.role} output", claimed, real, where)
        channels = 1 if manifest.input.colour == "gray" else 3
        if len(inputs[0].shape) != 4 or inputs[0].shape[0] != 1 or inputs[0].shape[3] != channels:
            raise ModelError(f"{where}: model input is {list(inputs[0].shape)} but a {manifest.input.colour} detector takes [1, height, width, {channels}]; fix the manifest's colour or use another model", Reason.TENSOR_MISMATCH)
        self._roles = {claimed.role: index for index, claimed in enumerate(manifest.outputs)}
        self._outputs = outputs
        self._decoder = self._make_decoder(manifest, outputs, where)
        self._bundle = bundle
        self._labels = manifest.labels
        self._keypoints = manifest.keypoints
        self._settings = settings
        self._fitter = ImageFitter(inputs[0], manifest.input.colour, manifest.input.fit, manifest.input.mean, manifest.input.std)
        self.reads_colour = manifest.input.colour != "gray"

    def _make_decoder(self, manifest: DetectionManifest, outputs: list[TensorSpec], where: str):
        decoding = manifest.decoding
        needed = ("boxes", "scores") if isinstance(decoding, (SsdDecoding, GflDecoding)) else ("boxes", "classes", "scores", "count")
        if sorted(self._roles) != sorted(needed) or len(self._roles) != len(outputs):
            raise ModelError(f"{where}: {decoding.type} decoding needs outputs {', '.join(needed)} once each, the manifest names {', '.join(c.role for c in manifest.outputs)}; fix the manifest")
        if isinstance(decoding, GflDecoding):
            return self._gfl_decoder(decoding, manifest, outputs, where)
        if not isinstance(decoding, SsdDecoding):
            return PostprocessDecoder(decoding.label_offset)
        try:
            decoder = SsdDecoder(decoding)
        except ValueError as exc:
            raise ModelError(f"{where}: {exc}; fix the manifest's anchors") from None
        boxes, scores = outputs[self._roles["boxes"]], outputs[self._roles["scores"]]
        anchors = len(decoder.anchors)
        if boxes.shape[1:] != (anchors, decoding.num_coords) or scores.shape[1] != anchors or scores.shape[-1] > len(manifest.labels):
            raise ModelError(f"{where}: the manifest's anchors make {anchors} boxes of {decoding.num_coords} values but the model outputs boxes {list(boxes.shape)} and scores {list(scores.shape)}; fix the anchor options", Reason.TENSOR_MISMATCH)
        if decoding.num_keypoints != len(manifest.keypoints) or decoding.keypoint_coord_offset + decoding.num_keypoints * decoding.num_values_per_keypoint > decoding.num_coords:
            raise ModelError(f"{where}: {decoding.num_keypoints} keypoints decoded but {len(manifest.keypoints)} named, in {decoding.num_coords} values per box; fix the manifest")
        return decoder

    def _gfl_decoder(self, decoding: GflDecoding, manifest: DetectionManifest, outputs: list[TensorSpec], where: str) -> GflDecoder:
        decoder = GflDecoder(decoding)
        boxes, scores = outputs[self._roles["boxes"]], outputs[self._roles["scores"]]
        points = len(decoder.points)
        if boxes.shape[1:] != (points, decoder.values_per_point) or scores.shape[1] != points or scores.shape[-1] > len(manifest.labels):
            raise ModelError(f"{where}: the manifest's strides make {points} anchor points of {decoder.values_per_point} distance bins but the model outputs boxes {list(boxes.shape)} and scores {list(scores.shape)}; fix the strides, reg_max or input size", Reason.TENSOR_MISMATCH)
        return decoder

    def prepare(self, image: np.ndarray) -> Prepared:
        tensor, fit = self._fitter(image)
        return Prepared([[tensor]], fit)

    def candidates(self, outputs: list[np.ndarray], score_threshold: float) -> Candidates:
        """One invoke's raw outputs -> detections in normalized input coordinates, suppressed, best first."""
        values = {role: self._outputs[index].dequantize(outputs[index]) for role, index in self._roles.items()}
        settings = self._settings
        if isinstance(self._decoder, (SsdDecoder, GflDecoder)):
            found = suppress(self._decoder.decode(values["boxes"], values["scores"], score_threshold), settings.nms_iou, settings.weighted_nms)
        else:
            found = self._decoder.decode(values["boxes"], values["classes"], values["scores"], values["count"], score_threshold)
        return found.best(settings.max_detections)

    def predictions(self, prepared: Prepared, outputs: list[list[np.ndarray]], score_threshold: float) -> list[Prediction]:
        fit: Fit = prepared.context
        found = self.candidates(outputs[0], score_threshold)
        fitter = self._fitter
        corners = fit.to_frame(found.boxes.reshape(-1, 2, 2), fitter.width, fitter.height)
        points = fit.to_frame(found.keypoints, fitter.width, fitter.height)
        predictions = []
        for i in range(len(found)):
            label = int(found.classes[i])
            if not 0 <= label < len(self._labels):
                continue  # a class the manifest has no label for
            box = _frame_box(corners[i], fit)
            if box is None:
                continue
            keypoints = [Keypoint(name=name, x=int(round(x)), y=int(round(y))) for name, (x, y) in zip(self._keypoints, points[i])] or None
            predictions.append(Prediction(label=self._labels[label], class_index=label, score=min(float(found.scores[i]), 1.0), box=box, keypoints=keypoints))
        return predictions

    def golden(self, run: Run) -> GoldenScore:
        manifest: DetectionManifest = self._bundle.manifest
        found = self.score_golden(run, manifest.score_threshold)
        recall = GoldenScore(f"recall at IoU {GOLDEN_IOU}", found.recall, manifest.min_golden_recall)
        precision = GoldenScore(f"precision at IoU {GOLDEN_IOU}", found.precision, manifest.min_golden_precision)
        return recall if not recall.passed or precision.passed else precision

    def score_golden(self, run: Run, score_threshold: float) -> GoldenCount:
        """Detections on every golden image against its true boxes, at IoU 0.5."""
        golden = self._bundle.golden
        count = GoldenCount()
        for index, image in enumerate(golden_images(golden)):
            prepared = self.prepare(image)
            predictions = self.predictions(prepared, [run(inputs) for inputs in prepared.invokes], score_threshold)
            mine = golden["box_images"] == index
            count.add(
                match(
                    np.array([[p.box.x, p.box.y, p.box.x + p.box.w, p.box.y + p.box.h] for p in predictions], np.float32).reshape(-1, 4),
                    np.array([p.score for p in predictions], np.float32),
                    np.array([p.class_index for p in predictions], np.int64),
                    xywh_to_corners(golden["boxes"][mine]),
                    golden["box_labels"][mine],
                    GOLDEN_IOU,
                )
            )
        return count


@dataclass
class GoldenCount:
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    def add(self, matched) -> None:
        self.true_positives += matched.true_positives
        self.false_positives += matched.false_positives
        self.false_negatives += matched.false_negatives

    @property
    def recall(self) -> float:
        truth = self.true_positives + self.false_negatives
        return self.true_positives / truth if truth else 1.0

    @property
    def precision(self) -> float:
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else 1.0


def xywh_to_corners(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def golden_images(golden: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The encoded golden images, decoded to BGR frames as a camera would deliver them."""
    starts = np.concatenate([[0], golden["image_ends"][:-1]])
    images = []
    for start, end in zip(starts, golden["image_ends"]):
        image = cv2.imdecode(golden["images"][int(start) : int(end)], cv2.IMREAD_COLOR)
        if image is None:
            raise ModelError(f"golden image {len(images)} does not decode; re-pack the bundle")
        images.append(image)
    return images


def _frame_box(corners: np.ndarray, fit: Fit) -> Box | None:
    """Corners (2, 2) in frame pixels -> a Box clipped to the frame, or None when nothing of it is inside."""
    x0, y0 = np.clip(corners[0], 0, [fit.width, fit.height])
    x1, y1 = np.clip(corners[1], 0, [fit.width, fit.height])
    x, y = int(round(x0)), int(round(y0))
    w, h = int(round(x1)) - x, int(round(y1)) - y
    if w <= 0 or h <= 0:
        return None
    return Box(x=x, y=y, w=w, h=h)
