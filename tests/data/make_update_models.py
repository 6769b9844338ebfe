"""Makes the small broken TFLite models the update tests install (run once; the outputs are committed).

    .venv/bin/python tests/data/make_update_models.py [NAME ...]   # e.g. stall; default: all of them

Needs TensorFlow (the `train` extra); the tests themselves never import it. Each model is a valid TFLite
file that misbehaves in one way a bad model update can:
- update-wrong-input.tflite: float32 input [1, 32, 32, 1] where the shipped model takes int8 [1, 28, 28, 1]
- update-constant.tflite: float32 [1, 28, 28, 1] -> the same softmax scores whatever the image
- update-nan.tflite: float32 [1, 28, 28, 1] -> NaN scores
- update-crash.tflite: float32 [1, 28, 28, 1]; invoke fails (GATHER index out of bounds) for an image whose
  pixels (0..1) sum to more than CRASH_ABOVE, i.e. most digits; fainter ones get varying scores
- update-stall.tflite: float32 [1, 28, 28, 1]; for an image brighter than CRASH_ABOVE, invoke spins in a WHILE
  loop of STALL_ROUNDS matrix products (seconds: a hung accelerator or runaway model); fainter ones are quick
"""

from pathlib import Path

import numpy as np
import tensorflow as tf

HERE = Path(__file__).resolve().parent
CRASH_ABOVE = 100.0
STALL_ROUNDS = 50_000


def convert(fn, shape) -> bytes:
    concrete = tf.function(fn, input_signature=[tf.TensorSpec(shape, tf.float32)]).get_concrete_function()
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], fn).convert()


def wrong_input(x):
    return tf.nn.softmax(tf.reshape(tf.reduce_mean(x, axis=[1, 2]), [1, 1]) * tf.ones([1, 10]))


def constant(x):
    bias = tf.constant(np.eye(10, dtype=np.float32)[1:2] * 3.0)  # always "1"
    return tf.nn.softmax(bias + 0.0 * tf.reshape(tf.reduce_sum(x), [1, 1]))


def nan(x):
    return tf.math.log(-1.0 - tf.reshape(tf.reduce_sum(x), [1, 1])) * tf.ones([1, 10])


def crash(x):
    total = tf.reduce_sum(x)
    index = tf.cast(total > CRASH_ABOVE, tf.int32) * 1000
    row = tf.gather(tf.constant(np.eye(10, dtype=np.float32)), tf.reshape(index, [1]))
    return tf.reshape(row, [1, 10]) + total * 0.001


def stall(x):
    total = tf.reduce_sum(x)
    rounds = tf.cast(total > CRASH_ABOVE, tf.int32) * STALL_ROUNDS
    _, spun = tf.while_loop(lambda i, m: i < rounds, lambda i, m: (i + 1, tf.tanh(tf.matmul(m, m))), [tf.constant(0), tf.fill([128, 128], total * 1e-5)])
    return tf.nn.softmax(tf.reshape(total * 0.01 * tf.range(10.0), [1, 10]) + tf.reduce_mean(spun))


MODELS = {"wrong-input": (wrong_input, [1, 32, 32, 1]), "constant": (constant, [1, 28, 28, 1]), "nan": (nan, [1, 28, 28, 1]), "crash": (crash, [1, 28, 28, 1]), "stall": (stall, [1, 28, 28, 1])}

if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or MODELS:  # names to (re)make, default all
        fn, shape = MODELS[name]
        (HERE / f"update-{name}.tflite").write_bytes(convert(fn, shape))
        print(name, (HERE / f"update-{name}.tflite").stat().st_size, "bytes")
