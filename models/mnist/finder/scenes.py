"""Synthetic camera frames for training the learned digit finder, made by the sample videos' own renderer.

Each scene is a desk with a sheet (plain, ruled, squared or coloured paper) or a chalkboard, 0-4 MNIST
**training** digits written on it, a hand-held camera, a lamp and a shadow, exactly as
`models/mnist/sample/make_video.py` draws the sample clips; only the conditions are drawn at random
between the plain and the hard clip's (and a little beyond), so the finder learns every one of them. The
clips use MNIST *test* digits and their own seeds, so nothing a clip shows was trained on.

A sample is the frame as the agent's finder network sees it (grey, after JPEG, resized, evened out) and
the true boxes (x, y, w, h) in finder-input pixels.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from agent.inference.tasks.learned_finder import evened
from models.mnist.sample.make_video import HARD, HEIGHT, NORMAL, WIDTH, camera_path, frame_boxes, lighting, place_digits, render, surface, write_ink

INPUT_SIZE = (160, 128)  # the finder's input, width x height: a 640x480 frame shrunk 4x across, 3.75x down
SURFACES = ("paper", "ruled", "grid", "coloured", "board", "paper", "ruled", "grid", "blank-paper", "blank-ruled", "blank-grid", "blank-board")
FRAMES_PER_SCENE = 4  # of a scene's 10 camera positions


def random_style(rng: np.random.Generator):
    """Conditions drawn between the plain clip's and a little past the hard clip's."""
    return replace(
        HARD if rng.random() < 0.5 else NORMAL,
        gap=float(rng.uniform(0.08, 0.5)),
        shadow_share=0.85,
        shadow_depth=(0.25, 0.7),
        gradient=float(rng.uniform(0.3, 0.9)),
        tilt=float(rng.uniform(15, 55)),
        blur=(0.6, 2.3),
        noise=float(rng.uniform(2, 7)),
        quality=int(rng.integers(25, 60)),
    )


def to_input(frame_bgr: np.ndarray, quality: int) -> np.ndarray:
    """A rendered frame as the finder's network receives it: MJPEG-compressed, decoded grey, shrunk to its
    input and evened out as the agent does (agent/inference/tasks/learned_finder.py)."""
    _, jpeg = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    grey = cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)
    return evened(cv2.resize(grey, INPUT_SIZE, interpolation=cv2.INTER_AREA))


def scene(seed: int, images: np.ndarray, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """One scene's frames: [(grey input image, boxes (N, 4) float32 in input pixels)]."""
    rng = np.random.default_rng([seed, 77])
    style = random_style(rng)
    kind = str(rng.choice(SURFACES))
    world, writable = surface(rng, kind)
    homographies = camera_path(rng, style)
    digits = [] if kind.startswith("blank") else place_digits(rng, images, labels, writable, homographies, style.gap)
    world = write_ink(rng, world, digits, kind)
    boxes = [frame_boxes(d.points, homographies) for d in digits]
    gains = lighting(rng, style)
    scale = np.array([INPUT_SIZE[0] / WIDTH, INPUT_SIZE[1] / HEIGHT] * 2, np.float32)
    samples = []
    for t in sorted(rng.choice(len(homographies), FRAMES_PER_SCENE, replace=False)):
        frame = render(world, homographies[t], gains[t], rng, style)
        frame_boxes_t = np.array([b[t] for b in boxes], np.float32).reshape(-1, 4)
        samples.append((to_input(frame, style.quality), frame_boxes_t * scale))
    return samples


def _scene_of(args: tuple[int, np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    return scene(*args)


def make_scenes(seeds: range, images: np.ndarray, labels: np.ndarray, processes: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every scene of `seeds` (in order, whatever the process count): images (N, H, W) uint8 and their boxes."""
    from multiprocessing import get_context

    cv2.setNumThreads(1)
    with get_context("fork").Pool(processes) as pool:
        scenes = pool.map(_scene_of, [(seed, images, labels) for seed in seeds], chunksize=8)
    samples = [sample for frames in scenes for sample in frames]
    return np.stack([image for image, _ in samples]), [boxes for _, boxes in samples]
