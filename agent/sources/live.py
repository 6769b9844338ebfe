"""Live sources (camera, RTSP/HTTP stream): captured on their own thread, newest frame only, reopened when lost.

A live source that cannot be opened is tried again for the `wait_s` it is given: the agent's start-up gives
`source.open_timeout_s` (a camera plugged in late, a stream that boots after the device). Once running, a
lost source is probed every `reconnect_initial_s`, doubling to at most `reconnect_max_s`: a short cap, so
frames flow again within about that long of the source's return, however long it was away.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import cv2
import numpy as np

from agent.errors import SourceError
from agent.settings import SourceSettings
from agent.sources.base import Frame, FrameSource, in_colour_or_grey

log = logging.getLogger(__name__)


class LiveSource(FrameSource):
    """A camera or stream read on its own thread; `read()` always gets the newest frame.

    Frames the pipeline was too slow (or too paced, `pace_fps`) to take are counted as dropped. If the
    device stops delivering, the capture thread reopens it, forever, until `close()`.
    """

    def __init__(self, name: str, open_capture: Callable[[], cv2.VideoCapture], settings: SourceSettings, wait_s: float = 0.0):
        super().__init__(name, settings.pace_fps, settings.colour)
        self._open_capture = open_capture
        self._settings = settings
        self._latest: np.ndarray | None = None
        self._latest_index = -1
        self._taken_index = -1
        capture = self._open(wait_s)
        self._thread = threading.Thread(target=self._capture_loop, args=(capture,), name=f"capture {name}", daemon=True)
        self._thread.start()

    def _open(self, wait_s: float) -> cv2.VideoCapture:
        """The opened capture, after retrying for up to `wait_s`; SourceError if it does not open."""
        settings = self._settings
        deadline = time.monotonic() + wait_s
        wait = settings.reconnect_initial_s
        attempts = 1
        while not (capture := self._open_capture()).isOpened():
            capture.release()
            left = deadline - time.monotonic()
            if left <= 0 or self.stopped:
                tried = f" ({attempts} attempts in {wait_s:g} s, source.open_timeout_s)" if attempts > 1 else ""
                raise SourceError(f"source {self.name}: cannot open it{tried}; check the device index or URL and that nothing else holds the camera")
            if attempts == 1:
                log.info("source %s: cannot open it yet; trying again for up to %g s", self.name, wait_s)
            self._pause(min(wait, left))
            wait = min(wait * 2, settings.reconnect_max_s)
            attempts += 1
        return capture

    def _capture_loop(self, capture: cv2.VideoCapture) -> None:
        index = 0
        wait = self._settings.reconnect_initial_s
        lost_at: float | None = None  # when the source stopped delivering, while it is away
        while not self.stopped:
            ok, image = capture.read() if capture.isOpened() else (False, None)
            if ok and image is not None:
                if lost_at is not None:
                    log.info("source reopened: %s delivers frames again after %.1f s away", self.name, time.monotonic() - lost_at)
                    lost_at, wait = None, self._settings.reconnect_initial_s
                with self._changed:
                    if self._latest_index > self._taken_index:
                        self.stats.dropped += 1
                    self._latest, self._latest_index = image, index
                    self._changed.notify_all()
                index += 1
                continue
            capture.release()
            if lost_at is None:
                log.warning("source %s: lost; trying to reopen it every %g s at most", self.name, self._settings.reconnect_max_s)
                lost_at = time.monotonic()
            if self._pause(wait):
                return
            wait = min(wait * 2, self._settings.reconnect_max_s)
            capture = self._open_capture()
            self.stats.reconnects += 1
        capture.release()

    def read(self) -> Frame | None:
        self._pacer.wait()
        with self._changed:
            while self._latest_index <= self._taken_index and not self.stopped:
                self._changed.wait(timeout=self._settings.read_timeout_s)
            if self.stopped:
                return None
            self._taken_index = self._latest_index
            image = self._latest
        # Converted here, not on the capture thread, so a frame the pipeline skips costs nothing more.
        return self._frame(in_colour_or_grey(image, self.colour), self._taken_index)

    def close(self) -> None:
        """Safe from any thread: the capture thread releases its own capture on the way out."""
        self.interrupt()
        self._thread.join(timeout=5)


def stream_opener(url: str, settings: SourceSettings) -> Callable[[], cv2.VideoCapture]:
    timeout_ms = int(settings.read_timeout_s * 1000)
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
    return lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
