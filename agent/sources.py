"""Frame sources, all through OpenCV: a camera, a video file, an image folder, an RTSP/HTTP stream.

Files are read frame by frame, every frame, in order (deterministic). Live sources (camera, stream)
capture on their own thread and keep only the newest frame, so a slow model never builds a backlog;
when the device or stream disappears they reopen it with exponential backoff.

Frames are grey unless colour is asked for: the digit finder reads nothing else. Decoding is the
biggest cost of a frame, so an MJPG file is read as its JPEG packets and libjpeg decodes each one
straight to grey, skipping the colour planes (0.50 ms instead of FFmpeg's 0.80 ms to BGR, plus the
conversion to grey, for a 640x480 frame); other codecs go through FFmpeg and are converted.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from agent.config import SourceSettings
from agent.errors import SourceError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")
MAX_CONSECUTIVE_BAD_FRAMES = 50  # a file this broken in a row is treated as ended, not looped over forever
MJPG = cv2.VideoWriter_fourcc(*"MJPG")


def in_colour_or_grey(image: np.ndarray, colour: bool) -> np.ndarray:
    """A decoded BGR frame as the pipeline wants it."""
    return image if colour else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def imread_flag(colour: bool) -> int:
    return cv2.IMREAD_COLOR if colour else cv2.IMREAD_GRAYSCALE


@dataclass(frozen=True)
class Frame:
    image: np.ndarray
    index: int
    captured_at: datetime
    source: str  # the device, URL or file this frame came from


@dataclass
class SourceStats:
    read: int = 0
    dropped: int = 0
    corrupt: int = 0
    reconnects: int = 0
    last_frame_monotonic: float | None = None


class FrameSource(ABC):
    """`read()` returns the next frame, or None once the source has ended (or was closed)."""

    def __init__(self, name: str):
        self.name = name
        self.stats = SourceStats()

    @abstractmethod
    def read(self) -> Frame | None: ...

    def close(self) -> None:
        """Release the device or file. Called from the thread that reads."""

    def interrupt(self) -> None:
        """Make a `read()` that is waiting for a frame return None soon. Safe from any thread or a signal
        handler: it releases nothing (OpenCV must not release a capture another thread is reading)."""

    def _frame(self, image: np.ndarray, index: int, source: str | None = None) -> Frame:
        self.stats.read += 1
        self.stats.last_frame_monotonic = time.monotonic()
        return Frame(image=image, index=index, captured_at=datetime.now(timezone.utc), source=source or self.name)


class Pacer:
    """Holds a file source to a camera's rate (`pace_fps`); a no-op when unset.

    Ticks are scheduled on a fixed grid, so a slow frame is caught up rather than shifting every later one.
    """

    def __init__(self, fps: float | None, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._period = 1.0 / fps if fps else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next = clock()

    def wait(self) -> None:
        if not self._period:
            return
        delay = self._next - self._clock()
        if delay > 0:
            self._sleep(delay)
        self._next = max(self._next + self._period, self._clock() - self._period)


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


class LiveSource(FrameSource):
    """A camera or stream read on its own thread; `read()` always gets the newest frame.

    Frames the pipeline was too slow to take are counted as dropped. If the device stops delivering,
    the capture thread reopens it with exponential backoff, forever, until `close()`.
    """

    def __init__(self, name: str, open_capture: Callable[[], cv2.VideoCapture], settings: SourceSettings):
        super().__init__(name)
        self._open_capture = open_capture
        self._settings = settings
        self._latest: np.ndarray | None = None
        self._latest_index = -1
        self._taken_index = -1
        self._closed = threading.Event()
        self._changed = threading.Condition()
        capture = open_capture()
        if not capture.isOpened():
            raise SourceError(f"source {name}: cannot open it; check the device index or URL and that nothing else holds the camera")
        self._thread = threading.Thread(target=self._capture_loop, args=(capture,), name=f"capture {name}", daemon=True)
        self._thread.start()

    def _capture_loop(self, capture: cv2.VideoCapture) -> None:
        index = 0
        backoff = self._settings.reconnect_initial_s
        while not self._closed.is_set():
            ok, image = capture.read() if capture.isOpened() else (False, None)
            if ok and image is not None:
                backoff = self._settings.reconnect_initial_s
                with self._changed:
                    if self._latest_index > self._taken_index:
                        self.stats.dropped += 1
                    self._latest, self._latest_index = image, index
                    self._changed.notify_all()
                index += 1
                continue
            capture.release()
            if self._closed.wait(backoff):
                break
            backoff = min(backoff * 2, self._settings.reconnect_max_s)
            capture = self._open_capture()
            self.stats.reconnects += 1
        capture.release()

    def read(self) -> Frame | None:
        with self._changed:
            while self._latest_index <= self._taken_index and not self._closed.is_set():
                self._changed.wait(timeout=self._settings.read_timeout_s)
            if self._closed.is_set():
                return None
            self._taken_index = self._latest_index
            image = self._latest
        # Converted here, not on the capture thread, so a frame the pipeline skips costs nothing more.
        return self._frame(in_colour_or_grey(image, self._settings.colour), self._taken_index)

    def interrupt(self) -> None:
        self._closed.set()
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Safe from any thread: the capture thread releases its own capture on the way out."""
        self.interrupt()
        self._thread.join(timeout=5)


def _stream_opener(url: str, settings: SourceSettings) -> Callable[[], cv2.VideoCapture]:
    timeout_ms = int(settings.read_timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    return lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def open_source(settings: SourceSettings) -> FrameSource:
    """The source a spec names: `camera:N`, a stream URL, an image folder, or a video file."""
    spec = settings.spec.strip()
    if spec.startswith("camera:"):
        device = spec.removeprefix("camera:")
        if not device.isdigit():
            raise SourceError(f"source {spec!r}: a camera is camera:N with N the device index, e.g. camera:0")
        return LiveSource(spec, lambda: cv2.VideoCapture(int(device)), settings)
    if spec.startswith(STREAM_SCHEMES):
        return LiveSource(spec, _stream_opener(spec, settings), settings)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFilesSource.from_folder(path, loop=settings.loop, pace_fps=settings.pace_fps, colour=settings.colour)
    return VideoFileSource(path, loop=settings.loop, pace_fps=settings.pace_fps, colour=settings.colour)
