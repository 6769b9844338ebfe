"""Write the bundled sample videos: real MNIST test digits on paper, as a webcam looking at a desk sees them.

The agent's demo and its accuracy test run on this video, so it must look like a camera, not like MNIST:
digits written in ink on paper (and in chalk on a board), 40-120 px tall, under uneven light and a
shadow, seen in slight perspective by a moving camera, blurred, noisy and JPEG-compressed. Every digit's
label and box (of its ink, after the warp) is written to truth.json beside the video.

With --hard it writes sample_hard.avi and truth_hard.json: the conditions the digit finder struggles with,
ruled, squared and coloured paper (lines run through and under the digits), digits close together, a deep
shadow in every scene, stronger perspective, more blur and noise.

Deterministic: the same seed and the same OpenCV give the same file. Run from the repository root:
    .venv/bin/python models/mnist/sample/make_video.py [--hard]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.inference.evaluate import load_mnist

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT, FPS = 640, 480, 15
SCENE_FRAMES = 10
WORLD = (1000, 800)  # the desk, in world pixels (about frame pixels: the camera's scale is near 1)
INK_BOX_ALPHA = 0.5  # the truth box covers the ink at least this opaque
MARGIN = 12  # every digit stays this far inside the frame in every frame of its scene
PAPER_COLOURS = {"yellow": [150, 228, 245], "pink": [212, 196, 246], "blue": [242, 222, 190]}  # BGR, coloured paper


@dataclass(frozen=True)
class Style:
    """How hard a video is. Surfaces: plain, ruled, grid or coloured paper, a chalkboard, or blank-* (nothing written)."""

    name: str
    scenes: tuple[str, ...]
    gap: float  # digits stay this share of their height apart
    shadow_share: float  # scenes with a moving shadow
    shadow_depth: tuple[float, float]  # light left in the shadow
    gradient: float  # lamp gradient across the frame, +-
    tilt: float  # camera perspective: corner offsets, +- px
    blur: tuple[float, float]  # defocus sigma, px
    noise: float  # sensor noise, grey levels (before the lens blur and the JPEG smooth it)
    quality: int  # MJPG quality, 0-100 (keeps each file near 4 MB)


NORMAL = Style("sample", ("paper",) * 11 + ("board",) * 3 + ("blank-paper", "blank-board"), 0.4, 0.7, (0.45, 0.65), 0.5, 22, (0.7, 1.2), 3.0, 40)
HARD = Style(
    "sample_hard",
    ("ruled",) * 5 + ("grid",) * 4 + ("coloured",) * 3 + ("board",) * 2 + ("blank-ruled", "blank-grid"),
    0.12, 1.0, (0.3, 0.5), 0.8, 45, (1.0, 2.0), 6.0, 30,
)


@dataclass
class Digit:
    label: int
    index: int  # in the MNIST test set
    alpha: np.ndarray  # ink opacity on the world, float32 in [0, 1], full world size
    points: np.ndarray  # world coordinates of its opaque ink, for the truth box


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean noise with features about `sigma` px across, scaled to unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def surface(rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The world image (BGR float) and the mask of where digits may be written (the sheet or the board)."""
    w, h = WORLD
    desk = np.array([70, 105, 140], np.float32) * rng.uniform(0.8, 1.1)  # wood: slow tone changes, fine grain
    tone = 8 * smooth_noise(rng, (h, w), 40)
    grain = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=30, sigmaY=1.2)
    grain *= 5 / max(float(grain.std()), 1e-6)
    world = desk + (tone + grain)[..., None] * np.array([0.6, 0.8, 1.0], np.float32)
    writable = np.zeros((h, w), bool)
    paper = kind.removeprefix("blank-")
    if paper != "board":
        colour = np.array([222, 232, 238], np.float32) + rng.uniform(-12, 8, 3).astype(np.float32)
        if paper == "coloured":
            colour = np.array(PAPER_COLOURS[rng.choice(list(PAPER_COLOURS))], np.float32) + rng.uniform(-8, 8, 3).astype(np.float32)
        # Half of the sheets leave the desk in view past one edge of the frame, to show paper edges.
        x0, y0, x1, y1 = 60, 60, w - 60, h - 60
        if rng.random() < 0.5:
            side = rng.integers(4)
            cut = int(rng.uniform(150, 230))
            x0, y0, x1, y1 = [x0 + cut * (side == 0), y0 + cut * (side == 1), x1 - cut * (side == 2), y1 - cut * (side == 3)]
        sheet = colour + 3 * smooth_noise(rng, (y1 - y0, x1 - x0), 2)[..., None]
        if paper in ("ruled", "grid"):
            rule_lines(rng, sheet, paper)
        world[y0:y1, x0:x1] = sheet
        writable[y0 + 25 : y1 - 25, x0 + 25 : x1 - 25] = True
    else:
        colour = np.array([48, 62, 44], np.float32) * rng.uniform(0.85, 1.15)
        smudge = 6 * smooth_noise(rng, (h, w), 25) + 3 * smooth_noise(rng, (h, w), 2)
        world[:] = colour + smudge[..., None]
        writable[40 : h - 40, 40 : w - 40] = True
    return world, writable


def rule_lines(rng: np.random.Generator, sheet: np.ndarray, paper: str) -> None:
    """Print the lines of ruled paper (light blue rules and a red margin) or squared paper on a sheet."""
    h, w = sheet.shape[:2]
    blue = np.array([214, 176, 150], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
    step = rng.uniform(30, 36) if paper == "ruled" else rng.uniform(20, 26)
    for y in np.arange(rng.uniform(10, step), h, step):
        cv2.line(sheet, (0, int(y)), (w - 1, int(y)), blue.tolist(), 2 if paper == "ruled" else 1, cv2.LINE_AA)
    if paper == "grid":
        for x in np.arange(rng.uniform(5, step), w, step):
            cv2.line(sheet, (int(x), 0), (int(x), h - 1), blue.tolist(), 1, cv2.LINE_AA)
    else:
        margin = int(rng.uniform(60, 110))
        cv2.line(sheet, (margin, 0), (margin, h - 1), [95, 95, 215], 2, cv2.LINE_AA)


def camera_path(rng: np.random.Generator, style: Style) -> list[np.ndarray]:
    """Homographies world -> frame for one scene: a hand-held camera drifting and tilting slightly."""
    w, h = WORLD
    centre = np.array([w / 2, h / 2]) + rng.uniform(-80, 80, 2)
    velocity = rng.uniform(-4, 4, 2)
    angle, spin = rng.uniform(-0.06, 0.06), rng.uniform(-0.004, 0.004)
    scale = rng.uniform(0.92, 1.08)
    tilt = rng.uniform(-style.tilt, style.tilt, (4, 2))  # corner offsets: the slight perspective of a camera not square on
    frame = np.float32([[0, 0], [WIDTH, 0], [WIDTH, HEIGHT], [0, HEIGHT]])
    homographies = []
    for t in range(SCENE_FRAMES):
        c, s = np.cos(angle + spin * t), np.sin(angle + spin * t)
        corners = (frame - [WIDTH / 2, HEIGHT / 2]) / scale + tilt
        world_quad = corners @ np.array([[c, s], [-s, c]]) + centre + velocity * t
        homographies.append(cv2.getPerspectiveTransform(world_quad.astype(np.float32), frame))
    return homographies


def frame_boxes(points: np.ndarray, homographies: list[np.ndarray]) -> list[list[int]]:
    """The frame-pixel box [x, y, w, h] of world points under each homography."""
    boxes = []
    for hom in homographies:
        p = cv2.perspectiveTransform(points[None], hom)[0]
        x0, y0 = np.floor(p.min(axis=0)).astype(int)
        x1, y1 = np.ceil(p.max(axis=0)).astype(int)
        boxes.append([int(x0), int(y0), int(x1 - x0), int(y1 - y0)])
    return boxes


def place_digits(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, writable: np.ndarray, homographies: list[np.ndarray], gap_share: float
) -> list[Digit]:
    """1-4 test digits, 40-120 px tall, `gap_share` of their height apart and fully in view for the whole scene."""
    w, h = WORLD
    wanted = int(rng.integers(1, 5))
    digits: list[Digit] = []
    taken: list[np.ndarray] = []  # per placed digit: its boxes over the scene, grown by a gap
    middle = np.linalg.inv(homographies[len(homographies) // 2])  # frame -> world
    for _ in range(400):
        if len(digits) == wanted:
            break
        index = int(rng.integers(len(images)))
        height = rng.uniform(40, 120)
        size = round(28 * height / 20)  # MNIST digits are 20 px tall in their 28 px image
        # Aim at a random spot of the view half-way through the scene, then check the whole scene.
        aim = rng.uniform([MARGIN + size / 2, MARGIN + size / 2], [WIDTH - MARGIN - size / 2, HEIGHT - MARGIN - size / 2])
        centre = cv2.perspectiveTransform(aim[None, None].astype(np.float32), middle)[0, 0]
        x, y = int(centre[0] - size / 2), int(centre[1] - size / 2)
        if x < 0 or y < 0 or x + size > w or y + size > h:
            continue
        if not writable[y : y + size, x : x + size].all():
            continue
        alpha = cv2.resize(images[index].astype(np.float32) / 255, (size, size), interpolation=cv2.INTER_CUBIC)
        alpha = np.clip(alpha, 0, 1)
        ys, xs = np.nonzero(alpha >= INK_BOX_ALPHA)
        points = np.stack([xs + x, ys + y], axis=1).astype(np.float32)
        boxes = np.array(frame_boxes(points, homographies))
        if (boxes[:, :2].min() < MARGIN) or (boxes[:, 0] + boxes[:, 2]).max() > WIDTH - MARGIN:
            continue
        if (boxes[:, 1] + boxes[:, 3]).max() > HEIGHT - MARGIN:
            continue
        gap = gap_share * boxes[:, 3].max()
        grown = np.column_stack([boxes[:, 0] - gap, boxes[:, 1] - gap, boxes[:, 0] + boxes[:, 2] + gap, boxes[:, 1] + boxes[:, 3] + gap])
        if any(_overlaps(grown, other) for other in taken):
            continue
        taken.append(grown)
        world_alpha = np.zeros((h, w), np.float32)
        world_alpha[y : y + size, x : x + size] = alpha
        digits.append(Digit(int(labels[index]), index, world_alpha, points))
    return digits


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two digits' grown boxes (x0, y0, x1, y1 per frame) meet in any frame."""
    return bool(((a[:, 0] < b[:, 2]) & (b[:, 0] < a[:, 2]) & (a[:, 1] < b[:, 3]) & (b[:, 1] < a[:, 3])).any())


def write_ink(rng: np.random.Generator, world: np.ndarray, digits: list[Digit], kind: str) -> np.ndarray:
    """The world with the digits written on it: pen or pencil on paper, chalk on the board."""
    if not digits:
        return world
    alpha = np.maximum.reduce([d.alpha for d in digits])
    if kind == "board":
        ink = np.array([228, 232, 232], np.float32)
        grain = np.clip(0.8 + 0.25 * smooth_noise(rng, alpha.shape, 0.8), 0.45, 1.0)  # chalk leaves gaps
        alpha = alpha * grain * rng.uniform(0.75, 0.95)
    else:
        pens = {"blue": [125, 50, 30], "black": [40, 38, 42], "pencil": [95, 92, 90]}
        ink = np.array(pens[rng.choice(list(pens))], np.float32)
        alpha = alpha * rng.uniform(0.85, 1.0)
    return world * (1 - alpha[..., None]) + ink * alpha[..., None]


def lighting(rng: np.random.Generator, style: Style) -> list[np.ndarray]:
    """Per-frame gain: a lamp gradient with vignetting, and for most scenes a soft moving shadow."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    u, v = xs / WIDTH - 0.5, ys / HEIGHT - 0.5
    gx, gy = rng.uniform(-style.gradient, style.gradient, 2)
    base = rng.uniform(0.75, 1.05) * (1 + gx * u + gy * v) * (1 - 0.35 * (u**2 + v**2))
    gains = []
    has_shadow = rng.random() < style.shadow_share
    direction = rng.uniform(0, 2 * np.pi)
    nx, ny = np.cos(direction), np.sin(direction)
    offset, drift, depth = rng.uniform(-0.25, 0.15), rng.uniform(-0.01, 0.01), rng.uniform(*style.shadow_depth)
    for t in range(SCENE_FRAMES):
        gain = base.copy()
        if has_shadow:  # the edge of something between the lamp and the desk (an arm, a monitor)
            side = (u * nx + v * ny) < offset + drift * t
            soft = cv2.GaussianBlur(side.astype(np.float32), (0, 0), 18)
            gain *= 1 - (1 - depth) * soft
        gains.append(gain)
    return gains


def render(world: np.ndarray, homography: np.ndarray, gain: np.ndarray, rng: np.random.Generator, style: Style) -> np.ndarray:
    """What the camera records: the warped world, lit, with sensor noise, defocused and smoothed."""
    view = cv2.warpPerspective(world, homography, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
    view = view * gain[..., None] + rng.normal(0, style.noise, (HEIGHT, WIDTH, 3)).astype(np.float32)
    view = cv2.GaussianBlur(view, (0, 0), rng.uniform(*style.blur))
    return np.clip(view, 0, 255).astype(np.uint8)


def truth_json(truth: dict) -> str:
    """JSON with one line per frame: readable, and a change to one frame is a one-line diff."""
    head = json.dumps({k: v for k, v in truth.items() if k != "frames"}, indent=1)[:-2]
    frames = ",\n  ".join(json.dumps(frame) for frame in truth["frames"])
    return f'{head},\n "frames": [\n  {frames}\n ]\n}}\n'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--quality", type=int, help="MJPG quality, 0-100 (default 40, and 30 for --hard: each file near 4 MB)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--hard", action="store_true", help="write sample_hard.avi and truth_hard.json")
    args = parser.parse_args()
    style = HARD if args.hard else NORMAL
    rng = np.random.default_rng(args.seed)
    mnist = load_mnist()  # the repo's own copy, checked against MNIST's sha256
    images, labels = mnist["x_test"], mnist["y_test"]
    order = rng.permutation(len(style.scenes))  # scenes of each kind spread over the video
    video = args.out / f"{style.name}.avi"
    # OpenCV's own MJPEG writer: no FFmpeg needed, same bytes everywhere, and it honours the quality.
    writer = cv2.VideoWriter(
        str(video),
        cv2.CAP_OPENCV_MJPEG,
        cv2.VideoWriter_fourcc(*"MJPG"),
        FPS,
        (WIDTH, HEIGHT),
    )
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, args.quality if args.quality is not None else style.quality)  # ignored when passed to the constructor
    if not writer.isOpened():
        raise SystemExit(f"{video}: OpenCV cannot write MJPG here")
    frames = []
    for kind in (style.scenes[i] for i in order):
        world, writable = surface(rng, kind)
        homographies = camera_path(rng, style)
        digits = [] if kind.startswith("blank") else place_digits(rng, images, labels, writable, homographies, style.gap)
        world = write_ink(rng, world, digits, kind)
        boxes = [frame_boxes(d.points, homographies) for d in digits]
        for t, (homography, gain) in enumerate(zip(homographies, lighting(rng, style))):
            writer.write(render(world, homography, gain, rng, style))
            frames.append(
                {
                    "frame": len(frames),
                    "surface": kind.removeprefix("blank-"),
                    "blank": not digits,
                    "digits": [{"label": d.label, "mnist_test_index": d.index, "box": b[t]} for d, b in zip(digits, boxes)],
                }
            )
    writer.release()
    truth = {
        "video": video.name,
        "width": WIDTH,
        "height": HEIGHT,
        "fps": FPS,
        "frame_count": len(frames),
        "seed": args.seed,
        "box": f"x, y, w, h in frame pixels of the ink at least {INK_BOX_ALPHA} opaque, after the camera warp",
        "frames": frames,
    }
    (args.out / ("truth_hard.json" if args.hard else "truth.json")).write_text(truth_json(truth))
    found = sum(len(f["digits"]) for f in frames)
    print(f"{video}: {len(frames)} frames, {found} digits, {video.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
