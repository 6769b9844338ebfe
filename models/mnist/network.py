"""The MNIST classifier: a small CNN sized for ~60 us int8 invokes on one core.

conv16-pool-conv32-pool-conv64-pool, then a dense layer over the 3x3x64 map. Batch norm after each
convolution trains faster and is folded into the convolution by the TFLite converter, so it costs
nothing at inference. Batch size 1 is fixed: the device classifies one digit crop per invoke.
"""

from __future__ import annotations

import keras
from keras import layers


def build_classifier(classes: int = 10, dropout: float = 0.25) -> keras.Model:
    inputs = keras.Input(shape=(28, 28, 1), name="image")
    x = inputs
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(classes, activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")
