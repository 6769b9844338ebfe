"""What every frame source shares: the Frame, its statistics, the FrameSource interface, pacing, grey conversion."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import cv2
import numpy as np


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
    """`read()` returns the next frame, or None once the source has ended (or was closed).

    `pace_fps` holds delivery to at most that many frames a second: a file is read like a camera, and a
    live source drops the frames in between.
    """

    def __init__(self, name: str, pace_fps: float | None = None, colour: bool = False):
        self.name = name
        self.colour = colour  # BGR frames, or grey; `set_colour` changes it between two reads
        self.stats = SourceStats()
        # Wakes whoever waits on this source (a paced read, the capture thread, a reader waiting for a frame)
        # when it is stopped. Reentrant, because a stop signal's handler notifies it on the thread that may
        # be inside it; `stopped` is set first, so a waiter checks it before sleeping.
        self._changed = threading.Condition()
        self.stopped = False
        self._pacer = Pacer(pace_fps, sleep=self._pause)

    @abstractmethod
    def read(self) -> Frame | None: ...

    def set_colour(self, colour: bool) -> None:
        """Deliver BGR (True) or grey frames from the next read on: the model swapped in reads the other kind."""
        self.colour = colour

    def close(self) -> None:
        """Release the device or file. Called from the thread that reads."""
        self.interrupt()

    def interrupt(self) -> None:
        """Make a `read()` that is waiting (for a frame, or for its pace) return None soon. Safe from any thread
        or a signal handler: it releases nothing (OpenCV must not release a capture another thread is reading)."""
        self.stopped = True
        with self._changed:
            self._changed.notify_all()

    def _pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`, ending early when the source is stopped; True if it was."""
        with self._changed:
            return self._changed.wait_for(lambda: self.stopped, seconds)

    def _frame(self, image: np.ndarray, index: int, source: str | None = None) -> Frame:
        self.stats.read += 1
        self.stats.last_frame_monotonic = time.monotonic()
        return Frame(image=image, index=index, captured_at=datetime.now(timezone.utc), source=source or self.name)


class Pacer:
    """Holds a source to at most `fps` frames a second; a no-op when unset.

    Ticks are scheduled on a fixed grid, so a slow frame is caught up rather than shifting every later one.
    """

    def __init__(self, fps: float | None, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self._clock = clock
        self._sleep = sleep
        self._next = clock()
        self.set_fps(fps)

    def set_fps(self, fps: float | None) -> None:
        """A new rate from the next tick on (None: no limit)."""
        self._period = 1.0 / fps if fps else 0.0

    def wait(self) -> None:
        if not self._period:
            return
        delay = self._next - self._clock()
        if delay > 0:
            self._sleep(delay)
        self._next = max(self._next + self._period, self._clock() - self._period)


