"""The learned digit finder: a small CenterNet-style network that marks digit centres and their boxes.

A 160x128 grey frame goes down to 1/32 of its width through depthwise-separable blocks (enough context to
tell a digit from a ruled line or a shadow edge), comes back up to 1/4 with skip connections, and ends in
two heads on a 40x32 grid (one cell = 4 input pixels):
- `centres`: for each cell, the probability that a digit's centre lies in it (sigmoid);
- `boxes`: the centre's offset inside its cell (x, y in cells) and the box size, log(w / SIZE_UNIT), log(h / SIZE_UNIT) in
  input pixels (agent/inference/tasks/learned_finder.py reads them).
About 10 M multiply-accumulates per frame; batch norm folds into the convolutions when converted.
"""

from __future__ import annotations

import keras
from keras import layers

GRID_STRIDE = 4  # input pixels per grid cell
PRIOR = 0.01  # the centre head starts out predicting this everywhere (focal-loss practice)


def _conv(x, filters: int, kernel: int = 1, strides: int = 1):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def _separable(x, filters: int, strides: int = 1):
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    return _conv(x, filters)


def build_finder(height: int = 128, width: int = 160) -> keras.Model:
    import math

    frame = keras.Input(shape=(height, width, 1), name="frame")
    x = _conv(frame, 16, 3, strides=2)  # 1/2
    quarter = _separable(x, 32, strides=2)  # 1/4
    x = _separable(quarter, 64, strides=2)  # 1/8
    eighth = _separable(x, 64)
    x = _separable(eighth, 96, strides=2)  # 1/16
    sixteenth = _separable(x, 96)
    x = _separable(sixteenth, 128, strides=2)  # 1/32: a big digit and the lines around it
    x = _separable(x, 128)
    x = layers.UpSampling2D(2)(_conv(x, 96))
    x = _separable(layers.Add()([x, sixteenth]), 96)  # 1/16
    x = layers.UpSampling2D(2)(_conv(x, 64))
    x = _separable(layers.Add()([x, eighth]), 64)  # 1/8
    x = layers.UpSampling2D(2)(_conv(x, 32))
    x = _separable(layers.Add()([x, quarter]), 32)  # 1/4
    centres = layers.Conv2D(1, 1, activation="sigmoid", name="centres", bias_initializer=keras.initializers.Constant(-math.log((1 - PRIOR) / PRIOR)))(x)
    boxes = layers.Conv2D(4, 1, name="boxes")(x)
    return keras.Model(frame, [centres, boxes], name="digit_finder")
