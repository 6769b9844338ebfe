"""Camera-like distortions of MNIST digits, so digits cut out of camera frames read like MNIST's own.

The camera path crops a digit, fits it in 20x20 and centres its centre of mass, so what is left to
cover is what that normalisation cannot undo: a little residual shift, slant and size, pen thickness,
focus blur and sensor noise. Every random draw comes from the caller's seeded numpy Generator, so a
training run is reproducible.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_ROTATION_DEG = 12.0
SCALE_RANGE = (0.88, 1.12)
MAX_SHIFT_PX = 2.0
KERNEL = np.ones((2, 2), np.uint8)


def distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One uint8 28x28 digit -> a randomly distorted copy (affine, stroke, blur, noise)."""
    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    scale = rng.uniform(*SCALE_RANGE)
    shift = rng.uniform(-MAX_SHIFT_PX, MAX_SHIFT_PX, size=2)
    matrix = cv2.getRotationMatrix2D((13.5, 13.5), angle, scale)
    matrix[:, 2] += shift
    out = cv2.warpAffine(image, matrix, (28, 28), flags=cv2.INTER_LINEAR, borderValue=0)
    stroke = rng.uniform()
    if stroke < 0.2:
        out = cv2.dilate(out, KERNEL)
    elif stroke < 0.35:
        out = cv2.erode(out, KERNEL)
    if rng.uniform() < 0.3:
        out = cv2.GaussianBlur(out, (3, 3), rng.uniform(0.4, 1.0))
    if rng.uniform() < 0.3:
        noise = rng.normal(0.0, rng.uniform(2.0, 12.0), size=out.shape)
        out = np.clip(out + noise, 0, 255).astype(np.uint8)
    return out


def augment_epoch(images: np.ndarray, rng: np.random.Generator, fraction: float = 0.7) -> np.ndarray:
    """A copy of `images` in which `fraction` of them (chosen at random) are distorted."""
    out = images.copy()
    for i in np.flatnonzero(rng.uniform(size=len(images)) < fraction):
        out[i] = distort(images[i], rng)
    return out
