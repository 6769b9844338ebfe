"""The capturer: frames the strategies choose go, as JPEG and a record, into the capture spool.

On the pipeline thread (a FrameObserver) it only decides and hands a reference to a small queue; its own
thread encodes and writes. A full queue or a used-up daily count drops the frame, counted: the pipeline
never waits for capture. Shadow disagreements arrive from the candidate's thread as update events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from agent.capture.spool import CaptureSpool
from agent.capture.strategies import Strategies
from agent.messages import CaptureImage, CaptureRecord, ModelRef, Prediction
from agent.settings import CaptureSettings
from agent.sources import Frame
from agent.updates.shadow import ShadowDisagreement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kept:
    """A frame chosen for keeping, waiting to be encoded."""

    frame: Frame
    strategy: str
    threshold: float
    model: ModelRef
    predictions: list[Prediction]
    candidate: ModelRef | None = None
    candidate_predictions: list[Prediction] | None = None


def crop(image: np.ndarray, prediction: Prediction) -> np.ndarray:
    box = prediction.box
    return image[box.y : box.y + box.h, box.x : box.x + box.w]


class Capturer:
    """Chooses frames (pipeline thread), encodes and spools them (its own thread); `wake` is told of each."""

    def __init__(self, settings: CaptureSettings, thing_name: str, spool: CaptureSpool, serving: Callable[[], ModelRef], threshold: Callable[[], float], wake: Callable[[], None] = lambda: None):
        self.settings = settings
        self.thing_name = thing_name
        self.spool = spool
        self.strategies = Strategies(settings)
        self._serving = serving
        self._threshold = threshold
        self._wake = wake
        self._queue: queue.Queue[Kept | None] = queue.Queue(maxsize=settings.queue)
        self._last_kept = -float("inf")  # monotonic time of the last frame kept
        self._thread = threading.Thread(target=self._write, name="capture", daemon=True)

    def start(self) -> Capturer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(10)

    # -- choosing: the pipeline thread and the shadow candidate's thread -----------------------------------

    def on_frame(self, frame: Frame, result, latency_ms: float) -> None:
        predictions = result.predictions if result is not None else []
        threshold = self._threshold()
        strategy = self.strategies.choose(predictions, threshold)
        if strategy is not None:
            self._offer(Kept(frame, strategy, threshold, result.model if result is not None else self._serving(), predictions))

    def on_update(self, event) -> None:
        """Pipeline update listener: a shadow candidate's disagreement is kept when the settings say so."""
        if isinstance(event, ShadowDisagreement) and self.settings.disagreements:
            self._offer(Kept(event.frame, "disagreement", event.threshold, self._serving(), event.serving, event.candidate_model, event.candidate))

    def _offer(self, kept: Kept) -> None:
        now = time.monotonic()
        if now - self._last_kept < self.settings.min_interval_s:
            return  # a near duplicate of the frame just kept: not chosen, not counted
        if not self.spool.has_room_today():
            self.spool.stats.dropped["daily_limit"] += 1
            return
        try:
            self._queue.put_nowait(kept)
        except queue.Full:
            self.spool.stats.dropped["queue_full"] += 1
            return
        self._last_kept = now

    # -- keeping: the capture thread ---------------------------------------------------------------------

    def _write(self) -> None:
        while (kept := self._queue.get()) is not None:
            try:
                if self.spool.add(*self.encode(kept)) is not None:
                    self._wake()
            except (OSError, cv2.error) as exc:
                self.spool.stats.dropped["write_failed"] += 1
                log.warning("capture not kept: %s", exc)

    def encode(self, kept: Kept) -> tuple[CaptureRecord, list[bytes]]:
        """The record and JPEG bytes of a kept frame (whole, or each prediction's box with `crops`)."""
        capture_id = str(uuid.uuid4())
        image = kept.frame.image
        boxed = [p for p in kept.predictions if p.box is not None] if self.settings.crops else []
        parts = [(crop(image, p), p.box) for p in boxed] or [(image, None)]
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.settings.jpeg_quality]
        images, data = [], []
        for n, (pixels, box) in enumerate(parts):
            ok, encoded = cv2.imencode(".jpg", pixels, quality)
            if not ok:
                raise OSError(f"JPEG encoding failed for frame {kept.frame.index}")
            images.append(CaptureImage(file=f"{capture_id}-{n}.jpg" if box is not None else f"{capture_id}.jpg", box=box))
            data.append(encoded.tobytes())
        record = CaptureRecord(
            capture_id=capture_id,
            thing_name=self.thing_name,
            captured_at=kept.frame.captured_at,
            source=kept.frame.source,
            frame=kept.frame.index,
            width=image.shape[1],
            height=image.shape[0],
            strategy=kept.strategy,
            score_threshold=kept.threshold,
            model=kept.model,
            predictions=kept.predictions,
            candidate=kept.candidate,
            candidate_predictions=kept.candidate_predictions,
            images=images,
        )
        return record, data
