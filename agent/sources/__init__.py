"""Frame sources, all through OpenCV: a camera, a video file, an image folder, an RTSP/HTTP stream.

Files are read frame by frame, every frame, in order (deterministic); one where no frame decodes is a
SourceError when it is opened. Live sources (camera, stream) capture on their own thread and keep only the
newest frame, so a slow model never builds a backlog; one not there at start-up is waited for, and one that
disappears later is reopened as soon as it is back.

Frames are grey unless colour is asked for: the digit finder reads nothing else.
"""

from __future__ import annotations

from pathlib import Path

import cv2

from agent.errors import SourceError
from agent.settings import SourceSettings
from agent.sources.base import Frame, FrameSource, Pacer
from agent.sources.files import ImageFilesSource, VideoFileSource
from agent.sources.live import LiveSource, stream_opener

STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")

__all__ = ["Frame", "FrameSource", "ImageFilesSource", "LiveSource", "Pacer", "VideoFileSource", "open_source"]


def open_source(settings: SourceSettings, *, wait_s: float = 0.0) -> FrameSource:
    """The source a spec names: `camera:N`, a stream URL, an image folder, or a video file.

    A camera or stream that is not there is tried again for up to `wait_s`: the agent's start-up passes
    `source.open_timeout_s`; a reopen while running (the watchdog, a configuration change) makes one attempt.
    """
    spec = settings.spec.strip()
    if spec.startswith("camera:"):
        device = spec.removeprefix("camera:")
        if not device.isdigit():
            raise SourceError(f"source {spec!r}: a camera is camera:N with N the device index, e.g. camera:0")
        return LiveSource(spec, lambda: cv2.VideoCapture(int(device)), settings, wait_s)
    if spec.startswith(STREAM_SCHEMES):
        return LiveSource(spec, stream_opener(spec, settings), settings, wait_s)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFilesSource.from_folder(path, loop=settings.loop, pace_fps=settings.pace_fps, colour=settings.colour)
    return VideoFileSource(path, loop=settings.loop, pace_fps=settings.pace_fps, colour=settings.colour)
