"""Sources read from disk: every frame of a video file, every image of a folder, in order (deterministic).

An MJPG file is read as its JPEG packets and libjpeg decodes each one straight to grey, skipping the colour
planes (0.50 ms instead of FFmpeg's 0.80 ms to BGR, plus the conversion, for a 640x480 frame); other codecs go
through FFmpeg and are converted.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from agent.errors import SourceError
from agent.sources.base import Frame, FrameSource, Pacer, imread_flag, in_colour_or_grey

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
MAX_CONSECUTIVE_BAD_FRAMES = 50  # a file this broken in a row is treated as ended, not looped over forever
MJPG = cv2.VideoWriter_fourcc(*"MJPG")


class VideoFileSource(FrameSource):
    """Every frame of a video file in order; a frame that fails to decode is skipped and counted."""

    def __init__(self, path: Path, loop: bool = False, pace_fps: float | None = None, colour: bool = False):
        super().__init__(str(path))
        if not path.is_file():
            raise SourceError(f"source {path}: no such video file; pass an existing file, a folder of images, camera:N or a stream URL")
        self._path = path
        self._loop = loop
        self._pacer = Pacer(pace_fps)
        self._colour = colour
        self._capture = self._open()
        self._index = 0

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self._path), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise SourceError(f"source {self._path}: OpenCV cannot decode this file; use an MJPG .avi or mp4v .mp4 video")
        self._frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        # MJPG packets are whole JPEG images: FFmpeg hands them over undecoded, and libjpeg decodes them.
        self._packets = int(capture.get(cv2.CAP_PROP_FOURCC)) == MJPG and capture.set(cv2.CAP_PROP_FORMAT, -1)
        return capture

    def _decoded(self, image: np.ndarray) -> np.ndarray | None:
        """What capture.read() gave as the frame to deliver; None for a JPEG packet that does not decode."""
        if self._packets:
            return cv2.imdecode(image, imread_flag(self._colour))
        return in_colour_or_grey(image, self._colour)

    def read(self) -> Frame | None:
        bad_in_a_row = 0
        # `capture`, not self._capture: a stop signal's handler may close() the source between two lines
        # here (it runs on this thread, between bytecodes); a released capture just reads nothing.
        while (capture := self._capture) is not None:
            position = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
            ok, image = capture.read()
            if self._capture is not capture:
                return None
            if ok and image is not None and (image := self._decoded(image)) is not None:
                self._pacer.wait()
                frame = self._frame(image, self._index)
                self._index += 1
                return frame
            if position < self._frame_count - 1 and bad_in_a_row < MAX_CONSECUTIVE_BAD_FRAMES:
                # A frame in the middle that did not decode: skip it, count it, go on.
                bad_in_a_row += 1
                self.stats.corrupt += 1
                self._index += 1
                if int(capture.get(cv2.CAP_PROP_POS_FRAMES)) <= position:
                    capture.set(cv2.CAP_PROP_POS_FRAMES, position + 1)
                continue
            if not self._loop or self._index == 0:
                self.close()
                return None
            capture.release()
            if self._capture is capture:
                self._capture = self._open()
        return None

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class ImageFilesSource(FrameSource):
    """A list of image files in order (a folder's images, or the files given to `edge-agent infer`).

    An image that does not decode is skipped and counted, like a corrupt video frame.
    """

    def __init__(self, name: str, files: list[Path], loop: bool = False, pace_fps: float | None = None, colour: bool = False):
        super().__init__(name)
        self._files = files
        self._loop = loop
        self._colour = colour
        self._pacer = Pacer(pace_fps)
        self._position = 0
        self._closed = False
        self.unreadable: list[Path] = []

    @classmethod
    def from_folder(cls, folder: Path, loop: bool = False, pace_fps: float | None = None, colour: bool = False) -> "ImageFilesSource":
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"source {folder}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point it at a folder of images")
        return cls(str(folder), files, loop, pace_fps, colour)

    @classmethod
    def from_files(cls, files: list[Path], colour: bool = False) -> "ImageFilesSource":
        for path in files:
            if not path.is_file():
                raise SourceError(f"image {path}: no such file; pass existing image files")
        return cls("images", files, colour=colour)

    def read(self) -> Frame | None:
        while not self._closed:
            if self._position == len(self._files):
                if not self._loop:
                    return None
                self._position = 0
            path = self._files[self._position]
            self._position += 1
            image = cv2.imread(str(path), imread_flag(self._colour))
            if image is None:
                self.stats.corrupt += 1
                self.unreadable.append(path)
                continue
            self._pacer.wait()
            return self._frame(image, self._position - 1, str(path))
        return None

    def close(self) -> None:
        self._closed = True


