"""Makes tests/data/not-an-image.tflite: a valid int8 TFLite model whose input is a vector, not an image.

Run once with the train extra installed (`.venv/bin/python tests/data/make_not_image_model.py`); the
tests use the committed output and never need TensorFlow.
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parent / "not-an-image.tflite"


def main() -> None:
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input(shape=(10,), batch_size=1), tf.keras.layers.Dense(10, activation="softmax")])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([np.random.default_rng(i).random((1, 10), np.float32)] for i in range(20))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    OUT.write_bytes(converter.convert())
    print(OUT, OUT.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
