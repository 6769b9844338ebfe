"""Write the face sample clip: scikit-image's photographs (scenes.py) as a webcam pointed at them sees them.

Each scene is shown for a few frames while the camera slowly zooms in, faces and none in turn, as an MJPG
.avi the agent reads like any video; every face's box in every frame goes to truth.json beside it.
Deterministic: the same OpenCV gives the same file. Run from the repository root:
    .venv/bin/python -m models.face.make_clip
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from models.face import scenes

HERE = Path(__file__).resolve().parent / "sample"
WIDTH, HEIGHT, FPS = 480, 360, 6
SCENE_FRAMES = 6
ZOOM = 0.05  # the camera closes in by this fraction over a scene
QUALITY = 75


def frame_of(scene: scenes.Scene, fill: bool, zoom: float) -> tuple[np.ndarray, list[list[int]]]:
    """The scene filling the frame (the overflow cut) or whole (black bars), magnified by 1 + zoom about the
    frame's centre; every face must stay whole inside the frame."""
    h, w = scene.image.shape[:2]
    scale = (max if fill else min)(WIDTH / w, HEIGHT / h) * (1 + zoom)
    dx, dy = (WIDTH - w * scale) / 2, (HEIGHT - h * scale) / 2
    boxes = [[round(x * scale + dx), round(y * scale + dy), round(fw * scale), round(fh * scale)] for x, y, fw, fh in scene.faces]
    if not all(x >= 0 and y >= 0 and x + fw <= WIDTH and y + fh <= HEIGHT for x, y, fw, fh in boxes):
        raise ValueError(f"scene {scene.name}: a face leaves the frame; show it whole or lower ZOOM")
    matrix = np.float32([[scale, 0, dx], [0, scale, dy]])
    image = cv2.warpAffine(scene.image, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT)
    return image, boxes


def write_clip(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    video = out / "faces.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, QUALITY)
    frames = []
    for scene, fill in scenes.clip_scenes():
        for step in range(SCENE_FRAMES):
            image, boxes = frame_of(scene, fill, ZOOM * step / (SCENE_FRAMES - 1))
            writer.write(image)
            frames.append({"frame": len(frames), "scene": scene.name, "faces": boxes})
    writer.release()
    truth = {"video": video.name, "width": WIDTH, "height": HEIGHT, "fps": FPS, "frame_count": len(frames), "frames": frames}
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.face.make_clip", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for faces.avi and truth.json")
    truth = write_clip(parser.parse_args(argv).out)
    print(f"{truth['frame_count']} frames, {sum(len(f['faces']) for f in truth['frames'])} faces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
