"""Makes the small detection models the detection tests run (run once; the outputs are committed).

    .venv/bin/python tests/data/make_detection_models.py

Needs TensorFlow (the `train` extra); the tests themselves never import it.
- detection-postprocess.tflite: float [1, 64, 64, 3] in [0, 1] -> TFLite's real TFLite_Detection_PostProcess
  op (as TF Object Detection API exports end): an 8 x 8 grid of anchors, one per 8 x 8 cell, no box offsets,
  class 0 ("bright") scored by the cell's mean brightness. A bright square filling a cell comes out as a
  detection whose box is that cell.
- detection-nan.tflite: float [1, 128, 128, 3] -> BlazeFace-shaped outputs (boxes [1, 896, 16], scores
  [1, 896, 1]) that are NaN whenever the image is not all zeros: a face model update gone bad.
"""

import tempfile
from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
GRID = 8


def postprocess_model() -> bytes:
    cells = (np.arange(GRID) + 0.5) / GRID
    yc, xc = np.meshgrid(cells, cells, indexing="ij")
    anchors = np.stack([yc.ravel(), xc.ravel(), np.full(GRID * GRID, 1 / GRID), np.full(GRID * GRID, 1 / GRID)], axis=1).astype(np.float32)
    signature = [
        'name: "TFLite_Detection_PostProcess"',
        'attr { key: "max_detections" value { i: 10 } }',
        'attr { key: "max_classes_per_detection" value { i: 1 } }',
        'attr { key: "detections_per_class" value { i: 100 } }',
        'attr { key: "use_regular_nms" value { b: false } }',
        'attr { key: "nms_score_threshold" value { f: 0.1 } }',
        'attr { key: "nms_iou_threshold" value { f: 0.5 } }',
        'attr { key: "y_scale" value { f: 10.0 } }',
        'attr { key: "x_scale" value { f: 10.0 } }',
        'attr { key: "h_scale" value { f: 5.0 } }',
        'attr { key: "w_scale" value { f: 5.0 } }',
        'attr { key: "num_classes" value { i: 1 } }',
    ]

    @tf.function(experimental_implements=" ".join(signature))
    def postprocess(box_encodings, class_predictions, anchors):
        boxes = tf.constant(0.0, dtype=tf.float32, name="boxes")
        classes = tf.constant(0.0, dtype=tf.float32, name="classes")
        scores = tf.constant(0.0, dtype=tf.float32, name="scores")
        count = tf.constant(0.0, dtype=tf.float32, name="num_detections")
        return boxes, classes, scores, count

    class Detector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 64, 64, 3], tf.float32, name="image")])
        def detect(self, image):
            brightness = tf.reshape(tf.reduce_mean(tf.nn.avg_pool2d(image, 8, 8, "VALID"), axis=3), [1, GRID * GRID, 1])
            scores = tf.concat([1.0 - brightness, brightness], axis=2)  # background first, as the op expects
            return postprocess(0.0 * tf.concat([brightness] * 4, axis=2), scores, tf.constant(anchors))

    # The op is fused from the function that implements it only on the SavedModel path (as the OD API exports).
    with tempfile.TemporaryDirectory() as saved:
        detector = Detector()
        tf.saved_model.save(detector, saved, signatures=detector.detect.get_concrete_function())
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.allow_custom_ops = True
        return converter.convert()


def nan_model() -> bytes:
    @tf.function(input_signature=[tf.TensorSpec([1, 128, 128, 3], tf.float32, name="input")])
    def broken(image):
        total = tf.reduce_sum(tf.abs(image))
        poison = tf.math.log(-total)  # NaN for any image with a non-zero pixel
        return tf.broadcast_to(poison, [1, 896, 16]), tf.broadcast_to(poison + total, [1, 896, 1])

    return tf.lite.TFLiteConverter.from_concrete_functions([broken.get_concrete_function()], broken).convert()


if __name__ == "__main__":
    for name, make in (("detection-postprocess", postprocess_model), ("detection-nan", nan_model)):
        (HERE / f"{name}.tflite").write_bytes(make())
        print(name, (HERE / f"{name}.tflite").stat().st_size, "bytes")
