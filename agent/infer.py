"""`edge-agent infer IMAGE...`: the serving pipeline run once over still images, one result per image."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from agent.app import build_pipeline
from agent.errors import SourceError
from agent.messages import InferenceResult, SequenceCounter
from agent.settings import Settings
from agent.sources import ImageFilesSource
from agent.transport.console import ConsoleTransport


def infer_images(settings: Settings, images: list[Path]) -> Iterator[InferenceResult]:
    """Yield a result for every image (even one with no digit); then fail naming any that did not decode."""
    pipeline = build_pipeline(settings, ConsoleTransport(), SequenceCounter(settings.thing_name), source=lambda frames: ImageFilesSource.from_files(images, colour=frames.colour), publish_empty=True)
    source = pipeline.source
    while (frame := source.read()) is not None:
        yield pipeline.process(frame)
    if source.unreadable:
        names = ", ".join(str(p) for p in source.unreadable)
        raise SourceError(f"image {names}: OpenCV cannot decode it; pass PNG, JPEG, BMP, TIFF or WebP files")
