"""Sources read from disk: every frame of a video file, every image of a folder, in order (deterministic).

An MJPG file is read as its JPEG packets and libjpeg decodes each one straight to grey, skipping the colour
planes (0.50 ms instead of FFmpeg's 0.80 ms to BGR, plus the conversion, for a 640x480 frame); other codecs go
through FFmpeg and are converted.

A frame or image that does not decode is skipped, counted (`stats.corrupt`) and, in the first pass, warned
about. A pass that decodes nothing is a SourceError: there is nothing to serve, and looping over it would
read the same broken file forever.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from pathlib import Path

import cv2
import numpy as np

from agent.errors import SourceError
from agent.sources.base import Frame, FrameSource, imread_flag, in_colour_or_grey

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
MAX_CONSECUTIVE_BAD_FRAMES = 50  # a file this broken in a row is treated as ended, not read on
MJPG = cv2.VideoWriter_fourcc(*"MJPG")
NAMES_SHOWN = 3  # undecodable images named in a message; the rest are counted


class FileSource(FrameSource):
    """A file or folder read pass after pass (one pass unless looping).

    The first frame is decoded when the source is opened, so a source where nothing decodes fails at
    start-up, before the agent announces itself online.
    """

    def __init__(self, name: str, loop: bool, pace_fps: float | None, colour: bool):
        super().__init__(name, pace_fps, colour)
        self._loop = loop
        self._first_pass = True
        self._decoded_in_pass = False
        self._ahead: tuple[np.ndarray, int, str | None] | None = None

    def _open_first(self) -> None:
        """Called last by a subclass's __init__."""
        self._ahead = self._next()

    @abstractmethod
    def _next(self) -> tuple[np.ndarray, int, str | None] | None:
        """The next frame that decodes, as (image, index, where it came from); None once the source ended."""

    def read(self) -> Frame | None:
        found, self._ahead = self._ahead or self._next(), None
        if found is None:
            return None
        self._pacer.wait()
        return None if self.stopped else self._frame(*found)

    def _decoded(self, skipped: str) -> None:
        """A frame decoded after `skipped` did not."""
        self._warn(skipped)
        self._decoded_in_pass = True

    def _next_pass(self, skipped: str, nothing_decodes: str) -> bool:
        """At the end of the file or folder: True to read it again (looping); False when the source ended.

        Raises SourceError(`nothing_decodes`) when nothing decoded in this whole pass.
        """
        if not self._decoded_in_pass:
            raise SourceError(f"source {self.name}: {nothing_decodes}")
        self._warn(skipped)
        self._first_pass = self._decoded_in_pass = False
        if not self._loop:
            self.close()
        return self._loop

    def _warn(self, skipped: str) -> None:
        """Once per place: a looping source meets the same broken frames every pass (the count goes on)."""
        if skipped and self._first_pass:
            log.warning("source %s: skipped %s that OpenCV cannot decode", self.name, skipped)


class VideoFileSource(FileSource):
    """Every frame of a video file in order; a frame that fails to decode is skipped and counted."""

    def __init__(self, path: Path, loop: bool = False, pace_fps: float | None = None, colour: bool = False):
        super().__init__(str(path), loop, pace_fps, colour)
        if not path.is_file():
            raise SourceError(f"source {path}: no such video file; pass an existing file, a folder of images, camera:N or a stream URL")
        self._path = path
        self._capture = self._open()
        self._index = 0
        self._open_first()

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(str(self._path), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise SourceError(f"source {self._path}: OpenCV cannot decode this file; use an MJPG .avi or mp4v .mp4 video")
        self._frame_count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        # MJPG packets are whole JPEG images: FFmpeg hands them over undecoded, and libjpeg decodes them.
        self._packets = int(capture.get(cv2.CAP_PROP_FOURCC)) == MJPG and capture.set(cv2.CAP_PROP_FORMAT, -1)
        return capture

    def _decode(self, image: np.ndarray) -> np.ndarray | None:
        """What capture.read() gave as the frame to deliver; None for a JPEG packet that does not decode."""
        if self._packets:
            return cv2.imdecode(image, imread_flag(self.colour))
        return in_colour_or_grey(image, self.colour)

    def _next(self) -> tuple[np.ndarray, int, str | None] | None:
        bad: list[int] = []  # indices of the frames skipped on the way to the next good one
        # `capture`, not self._capture: close() from another thread may replace it between two lines here;
        # a released capture just reads nothing.
        while (capture := self._capture) is not None and not self.stopped:
            position = int(capture.get(cv2.CAP_PROP_POS_FRAMES))
            ok, image = capture.read()
            if self._capture is not capture:
                return None
            if ok and image is not None and (image := self._decode(image)) is not None:
                self._decoded(self._describe(bad))
                self._index += 1
                return image, self._index - 1, None
            if position < self._frame_count - 1 and len(bad) < MAX_CONSECUTIVE_BAD_FRAMES:
                # A frame in the middle that did not decode: skip it, count it, go on.
                bad.append(self._index)
                self.stats.corrupt += 1
                self._index += 1
                if int(capture.get(cv2.CAP_PROP_POS_FRAMES)) <= position:
                    capture.set(cv2.CAP_PROP_POS_FRAMES, position + 1)
                continue
            rest = "; the rest of the file is not read" if position < self._frame_count - 1 else ""
            nothing = f"no frame of it decodes ({self._describe(bad) or 'the file holds none'}{rest}); re-encode it as an MJPG .avi or mp4v .mp4 video"
            if not self._next_pass(self._describe(bad) + rest, nothing):
                return None
            capture.release()
            if self._capture is capture:
                self._capture = self._open()
            bad = []
        return None

    @staticmethod
    def _describe(bad: list[int]) -> str:
        if not bad:
            return ""
        return f"frame {bad[0]}" if len(bad) == 1 else f"{len(bad)} frames ({bad[0]}-{bad[-1]})"

    def close(self) -> None:
        super().close()
        if self._capture is not None:
            self._capture.release()
            self._capture = None


class ImageFilesSource(FileSource):
    """A list of image files in order (a folder's images, or the files given to `edge-agent infer`).

    An image that does not decode is skipped and counted, like a corrupt video frame.
    """

    def __init__(self, name: str, files: list[Path], loop: bool = False, pace_fps: float | None = None, colour: bool = False):
        super().__init__(name, loop, pace_fps, colour)
        self._files = files
        self._position = 0
        self.unreadable: list[Path] = []
        self._open_first()

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

    def _next(self) -> tuple[np.ndarray, int, str | None] | None:
        bad: list[Path] = []  # the images skipped on the way to the next good one
        while not self.stopped:
            if self._position == len(self._files):
                nothing = f"OpenCV cannot decode any of its {self._describe(self._files)}; pass PNG, JPEG, BMP, TIFF or WebP files"
                if not self._next_pass(self._describe(bad), nothing):
                    return None
                self._position, bad = 0, []
            path = self._files[self._position]
            self._position += 1
            image = cv2.imread(str(path), imread_flag(self.colour))
            if image is None:
                self.stats.corrupt += 1
                if self._first_pass:
                    self.unreadable.append(path)
                bad.append(path)
                continue
            self._decoded(self._describe(bad))
            return image, self._position - 1, str(path)
        return None

    @staticmethod
    def _describe(paths: list[Path]) -> str:
        if not paths:
            return ""
        names = ", ".join(str(p) for p in paths[:NAMES_SHOWN])
        more = f" and {len(paths) - NAMES_SHOWN} more" if len(paths) > NAMES_SHOWN else ""
        return f"{len(paths)} image{'s' if len(paths) > 1 else ''} ({names}{more})"
