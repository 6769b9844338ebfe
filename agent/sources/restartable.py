"""A live source that can be reopened in place while the pipeline is blocked reading it."""

from __future__ import annotations

from typing import Callable

from agent.sources.base import Frame, FrameSource


class RestartableSource(FrameSource):
    """Wraps a live source; `restart()` (from the watchdog's thread) swaps in a freshly opened one.

    The replacement counts into the same stats, so counters never go backwards.
    """

    def __init__(self, source: FrameSource, reopen: Callable[[], FrameSource]):
        super().__init__(source.name, colour=source.colour)
        self.stats = source.stats
        self._source = source
        self._reopen = reopen

    def read(self) -> Frame | None:
        while True:
            source = self._source
            frame = source.read()
            if frame is not None or self.stopped or source is self._source:
                return frame
            # The source this read was blocked on was replaced: read from the new one.

    def restart(self) -> None:
        """Open a fresh source (SourceError if it cannot be opened) and close the stuck one."""
        fresh = self._reopen()
        fresh.stats = self.stats
        stuck, self._source = self._source, fresh
        stuck.close()
        if self.stopped:  # the agent stopped while the fresh source was opening
            fresh.close()

    def set_colour(self, colour: bool) -> None:
        super().set_colour(colour)
        self._source.set_colour(colour)

    def interrupt(self) -> None:
        self.stopped = True
        self._source.interrupt()

    def close(self) -> None:
        self.stopped = True
        self._source.close()
