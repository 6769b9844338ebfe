"""`mnist-digits`: every handwritten digit in a frame, found, brought into MNIST's form and classified.

The finder makes one 28x28 image per digit: the bundle's learned finder model (learned_finder.py) when it
carries one, or the hand-written OpenCV finder (digit_finder.py), as tasks.mnist_digits.finder says. The
model classifies one digit per invoke
(the shipped models have batch size 1); each digit becomes a prediction with its box in frame pixels.
Golden check: top-1 accuracy on the bundle's golden digits.
"""

from __future__ import annotations

import numpy as np

from agent.bundles.bundle import Bundle
from agent.errors import ModelError, Reason
from agent.inference.backends.base import TensorSpec
from agent.inference.tasks.base import GoldenScore, Prepared, Run, Task, check_tensor
from agent.inference.tasks.digit_finder import MNIST_SIZE, DigitFinder
from agent.inference.tasks.learned_finder import FINDER_FILE, LearnedDigitFinder
from agent.messages import Box, Prediction
from agent.settings import DigitFinderSettings

INPUT_SHAPE = (1, MNIST_SIZE, MNIST_SIZE, 1)


def quantize_digits(spec: TensorSpec, images: np.ndarray) -> np.ndarray:
    """Float digits in [0, 1] (N, 28, 28) -> the input tensor's dtype, all at once (N, 28, 28, 1)."""
    return spec.quantize(images.reshape(len(images), *INPUT_SHAPE[1:]))


def digit_scores(spec: TensorSpec, outputs: list[list[np.ndarray]]) -> np.ndarray:
    """Each invoke's output -> one row of float scores per digit."""
    if not outputs:
        return np.empty((0, spec.shape[-1]), np.float32)
    return spec.dequantize(np.concatenate([out[0].reshape(1, -1) for out in outputs]))


def classify_digits(run: Run, input_spec: TensorSpec, output_spec: TensorSpec, images: np.ndarray) -> np.ndarray:
    """Float digits in [0, 1] already in MNIST's form -> scores (N, classes), one invoke each: the golden
    set, the MNIST test set, and the training program's check of the model it converted."""
    quantized = quantize_digits(input_spec, images)
    return digit_scores(output_spec, [run([quantized[i : i + 1]]) for i in range(len(images))])


def make_finder(bundle: Bundle, settings: DigitFinderSettings) -> DigitFinder | LearnedDigitFinder:
    """The finder the settings ask for: the bundle's learned one when it carries one (auto), or OpenCV's."""
    carries = FINDER_FILE in bundle.manifest.files
    if settings.finder == "learned" and not carries:
        raise ModelError(f"{bundle.root}: tasks.mnist_digits.finder is learned but this bundle has no {FINDER_FILE}; set it to auto or opencv, or use a bundle with a finder model", Reason.INVALID_BUNDLE)
    if settings.finder == "opencv" or not carries:
        return DigitFinder(settings)
    return LearnedDigitFinder(bundle.root / FINDER_FILE, settings)


class MnistDigitsTask(Task):
    name = "mnist-digits"

    def __init__(self, bundle: Bundle, inputs: list[TensorSpec], outputs: list[TensorSpec], settings: DigitFinderSettings):
        where = str(bundle.root)
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{where}: an mnist-digits model has 1 input and 1 output tensor, this one {len(inputs)} and {len(outputs)}", Reason.TENSOR_MISMATCH)
        manifest = bundle.manifest
        check_tensor("input", manifest.input, inputs[0], where)
        check_tensor("output", manifest.output, outputs[0], where)
        if inputs[0].shape != INPUT_SHAPE:
            kind = "an image" if len(inputs[0].shape) == 4 else "not an image (NHWC)"
            raise ModelError(f"{where}: model input is {list(inputs[0].shape)}, {kind}, but mnist-digits makes {list(INPUT_SHAPE)}; use a model built for it", Reason.TENSOR_MISMATCH)
        if outputs[0].shape[-1] != len(bundle.labels):
            raise ModelError(f"{where}: model has {outputs[0].shape[-1]} outputs but the manifest has {len(bundle.labels)} labels; re-pack the bundle", Reason.TENSOR_MISMATCH)
        self._bundle = bundle
        self._input, self._output = inputs[0], outputs[0]
        self._labels = bundle.labels
        self._finder = make_finder(bundle, settings or DigitFinderSettings())

    def prepare(self, image: np.ndarray) -> Prepared:
        found = self._finder.find(image)
        quantized = self._quantize(found.images)
        return Prepared([[quantized[i : i + 1]] for i in range(len(found))], found.boxes)

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        return quantize_digits(self._input, images)

    def scores(self, outputs: list[list[np.ndarray]]) -> np.ndarray:
        return digit_scores(self._output, outputs)

    def predictions(self, prepared: Prepared, outputs: list[list[np.ndarray]], score_threshold: float) -> list[Prediction]:
        predictions = []
        for row, (x, y, w, h) in zip(self.scores(outputs), prepared.context):
            best = int(np.argmax(row))
            score = float(row[best])
            if score >= score_threshold:
                box = Box(x=int(x), y=int(y), w=int(w), h=int(h))
                predictions.append(Prediction(label=self._labels[best], class_index=best, score=min(score, 1.0), box=box))
        return predictions

    def classify(self, run: Run, images: np.ndarray) -> np.ndarray:
        return classify_digits(run, self._input, self._output, images)

    def golden(self, run: Run) -> GoldenScore:
        bundle = self._bundle
        scores = self.classify(run, bundle.golden_x.astype(np.float32) / 255.0)
        accuracy = float(np.mean(np.argmax(scores, axis=1) == bundle.golden_y))
        return GoldenScore("accuracy", accuracy, bundle.manifest.min_golden_accuracy)
