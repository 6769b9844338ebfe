"""The face detector's test pictures, all made from scikit-image's bundled images (no download).

Two photographs have a face (the astronaut and the cameraman); coffee, the cat and the text page have none.
Their faces were boxed by hand the way BlazeFace boxes faces (brows to chin, ear or cheek to cheek or nose tip as seen). Composites move, scale, mirror and
combine those faces over other bundled images, so every true box is known exactly: they make the golden
set beside the originals, and the frames of the sample clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from models.detector_bundle import photograph

# Hand-drawn boxes (x, y, w, h) in the original 512 x 512 photographs.
FACES = {"astronaut": (176, 86, 94, 98), "camera": (184, 126, 70, 72)}
NEGATIVES = ("coffee", "chelsea", "text")


@dataclass
class Scene:
    """A picture and the faces in it, as (x, y, w, h) in its pixels."""

    name: str
    image: np.ndarray  # BGR
    faces: list[tuple[float, float, float, float]] = field(default_factory=list)


def originals() -> list[Scene]:
    return [Scene(name, photograph(name), [FACES[name]] if name in FACES else []) for name in ("astronaut", "camera", *NEGATIVES)]


def crop(scene: Scene, x: int, y: int, w: int, h: int) -> Scene:
    """A window of `scene`; faces move with it (the windows used here hold their faces whole)."""
    return Scene(scene.name, scene.image[y : y + h, x : x + w].copy(), [(fx - x, fy - y, fw, fh) for fx, fy, fw, fh in scene.faces])


def scaled(scene: Scene, scale: float) -> Scene:
    image = cv2.resize(scene.image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return Scene(scene.name, image, [(fx * scale, fy * scale, fw * scale, fh * scale) for fx, fy, fw, fh in scene.faces])


def mirrored(scene: Scene) -> Scene:
    width = scene.image.shape[1]
    return Scene(scene.name, np.ascontiguousarray(scene.image[:, ::-1]), [(width - fx - fw, fy, fw, fh) for fx, fy, fw, fh in scene.faces])


def pasted(name: str, background: Scene, *parts: tuple[Scene, int, int]) -> Scene:
    """Each part pasted at (x, y) on a copy of the background; the faces of all of them."""
    canvas = background.image.copy()
    faces = list(background.faces)
    for part, x, y in parts:
        h, w = part.image.shape[:2]
        canvas[y : y + h, x : x + w] = part.image
        faces += [(fx + x, fy + y, fw, fh) for fx, fy, fw, fh in part.faces]
    return Scene(name, canvas, faces)


def cover(name: str, photo: str, width: int, height: int) -> Scene:
    """A bundled photograph resized to cover width x height, centre-cropped."""
    image = photograph(photo)
    scale = max(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    top, left = (resized.shape[0] - height) // 2, (resized.shape[1] - width) // 2
    return Scene(name, resized[top : top + height, left : left + width].copy())


def composites() -> list[Scene]:
    """Faces at other sizes and places, mirrored, two at once, and new negatives."""
    astronaut, camera = (Scene(n, photograph(n), [FACES[n]]) for n in FACES)
    return [
        pasted("astronaut-on-moon", cover("moon", "moon", 640, 480), (scaled(astronaut, 0.8), 200, 40)),
        replace(scaled(mirrored(crop(camera, 100, 40, 300, 225)), 1.6), name="camera-mirrored-closer"),
        pasted("two-faces", cover("coffee", "coffee", 420, 240), (crop(astronaut, 125, 30, 200, 210), 0, 15), (crop(camera, 140, 70, 200, 170), 215, 35)),
        cover("rocket", "rocket", 480, 360),
        cover("chelsea-wide", "chelsea", 480, 270),
    ]


def golden_scenes() -> list[Scene]:
    return originals() + composites()


def clip_scenes() -> list[tuple[Scene, bool]]:
    """The scenes of the sample clip in order, faces and none in turn, each with how the camera frames it:
    True fills the frame (a face close to the camera, as the short-range model expects), False shows the
    picture whole. The pictures without faces are shown whole, at about the scale of the golden photographs:
    closer, BlazeFace scores the cup and the cat's face 0.50 to 0.59 (MediaPipe's own graph too; see
    MODEL_CARD.md), which a threshold of 0.5 would publish."""
    named = {scene.name: scene for scene in golden_scenes()}
    order = [("astronaut", True), ("coffee", False), ("camera", True), ("chelsea-wide", False), ("two-faces", False), ("text", False), ("camera-mirrored-closer", True)]
    return [(named[name], fill) for name, fill in order]
