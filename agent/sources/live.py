"""Live sources (camera, RTSP/HTTP stream): captured on their own thread, newest frame only, reopened with backoff."""

from __future__ import annotations

import threading
from typing import Callable

import cv2
import numpy as np

from agent.errors import SourceError
from agent.settings import SourceSettings
from agent.sources.base import Frame, FrameSource, in_colour_or_grey


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


def stream_opener(url: str, settings: SourceSettings) -> Callable[[], cv2.VideoCapture]:
    timeout_ms = int(settings.read_timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    return lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


