"""Frame sources, all through OpenCV: a camera, a video file, an image folder, an RTSP/HTTP stream.

Files are read frame by frame, every frame, in order (deterministic). Live sources (camera, stream)
capture on their own thread and keep only the newest frame, so a slow model never builds a backlog;
when the device or stream disappears they reopen it with exponential backoff.

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


def open_source(settings: SourceSettings) -> FrameSource:
    """The source a spec names: `camera:N`, a stream URL, an image folder, or a video file."""
    spec = settings.spec.strip()
    if spec.startswith("camera:"):
        device = spec.removeprefix("camera:")
        if not device.isdigit():
            raise SourceError(f"source {spec!r}: a camera is camera:N with N the device index, e.g. camera:0")
        return LiveSource(spec, lambda: cv2.VideoCapture(int(device)), settings)
    if spec.startswith(STREAM_SCHEMES):
        return LiveSource(spec, stream_opener(spec, settings), settings)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFilesSource.from_folder(path, loop=settings.loop, pace_fps=settings.pace_fps, colour=settings.colour)
    return VideoFileSource(path, loop=settings.loop, pace_fps=settings.pace_fps, colour=settings.colour)
