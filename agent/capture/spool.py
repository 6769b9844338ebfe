"""The capture spool: kept frames wait on disk until they are uploaded, through outages and restarts.

One capture is its JPEG file(s) and its record (`<id>.json`, agent.messages.CaptureRecord). Every file is
written to a temporary name, fsynced and renamed, and the record is written last: a record on disk means
a complete capture, so a crash leaves either a whole capture or stray images, which the next start removes.
A capture leaves the spool only once the uploader has put all of it in S3, so nothing is lost; its S3 keys
are its id, so an upload repeated after a crash replaces the same objects and nothing is duplicated.

Bounded: a daily count (kept across restarts in `.counts.json`), a total size (the oldest waiting captures
are dropped past it) and an age; every drop is counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from agent.bundles.store import replace_file
from agent.errors import ConfigError
from agent.messages import CaptureRecord

log = logging.getLogger(__name__)

COUNTS = ".counts.json"
STRAY_AFTER_S = 60.0  # images without a record this old were left by a crash


@dataclass(frozen=True)
class Capture:
    """A complete capture in the spool: its record and the files that make it up (images, then record)."""

    record: CaptureRecord
    path: Path  # the record

    @property
    def images(self) -> list[Path]:
        return [self.path.parent / image.file for image in self.record.images]

    @property
    def files(self) -> list[Path]:
        return [*self.images, self.path]

    @property
    def size(self) -> int:
        return sum(file.stat().st_size for file in self.files if file.exists())


@dataclass
class SpoolStats:
    kept: Counter = field(default_factory=Counter)  # strategy -> captures written
    dropped: Counter = field(default_factory=Counter)  # reason -> captures not kept or thrown away
    uploaded: int = 0
    uploaded_bytes: int = 0
    upload_failures: int = 0
    waiting: int = 0
    waiting_bytes: int = 0


class CaptureSpool:
    """Captures on disk, oldest first, within a daily count, a size and an age."""

    def __init__(self, root: Path, *, max_per_day: int, max_bytes: int, max_age_s: float, clock=time.time):
        self.root = Path(root)
        self.max_per_day, self.max_bytes, self.max_age_s = max_per_day, max_bytes, max_age_s
        self.stats = SpoolStats()
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"capture.spool {self.root}: cannot create it ({exc.strerror}); set capture.spool to a writable directory") from None
        self._counts: dict[str, int] = self._read_counts()
        self._clean()
        self._recount()

    # -- keeping ----------------------------------------------------------------------------------------

    def today(self) -> str:
        return datetime.fromtimestamp(self._clock(), timezone.utc).strftime("%Y-%m-%d")

    def has_room_today(self) -> bool:
        """Whether today's count allows one more (read without the lock: the pipeline thread asks)."""
        return self._counts.get(self.today(), 0) < self.max_per_day

    def add(self, record: CaptureRecord, images: list[bytes]) -> Capture | None:
        """Write one capture (images, then its record); None if today's count is used up."""
        with self._lock:
            day = self.today()
            if self._counts.get(day, 0) >= self.max_per_day:
                self.stats.dropped["daily_limit"] += 1
                return None
            for image, data in zip(record.images, images):
                replace_file(self.root / image.file, data)
            path = self.root / f"{record.capture_id}.json"
            replace_file(path, record.model_dump_json(exclude_none=True).encode())
            self._counts = {day: self._counts.get(day, 0) + 1}  # only today's count matters from now on
            replace_file(self.root / COUNTS, json.dumps(self._counts).encode())
            capture = Capture(record, path)
            self.stats.kept[record.strategy] += 1
            self.stats.waiting += 1
            self.stats.waiting_bytes += capture.size
            self._within_size()
            return capture

    # -- sending --------------------------------------------------------------------------------------

    def waiting(self) -> list[Capture]:
        """Every complete capture, oldest first; those past the age limit are dropped (and counted) here."""
        with self._lock:
            captures = []
            for capture in self._captures():
                if self._clock() - capture.record.captured_at.timestamp() > self.max_age_s:
                    self._drop(capture, "too_old")
                else:
                    captures.append(capture)
            return captures

    def sent(self, capture: Capture, size: int) -> None:
        """The capture is in S3: remove it (record first, so a crash midway leaves stray images, not a
        record pointing at nothing)."""
        with self._lock:
            if not capture.path.exists():
                return
            self._remove(capture)
            self.stats.uploaded += 1
            self.stats.uploaded_bytes += size

    # -- the rest ------------------------------------------------------------------------------------------

    def _captures(self) -> list[Capture]:
        found = []
        for path in self.root.glob("*.json"):
            if path.name.startswith("."):
                continue
            try:
                found.append(Capture(CaptureRecord.model_validate_json(path.read_bytes()), path))
            except (OSError, ValidationError) as exc:
                log.warning("capture spool: %s is unreadable (%s); removed", path.name, type(exc).__name__)
                path.unlink(missing_ok=True)
        return sorted(found, key=lambda capture: (capture.record.captured_at, capture.record.capture_id))

    def _within_size(self) -> None:
        if self.stats.waiting_bytes <= self.max_bytes:
            return
        for capture in self._captures():
            if self.stats.waiting_bytes <= self.max_bytes:
                break
            self._drop(capture, "spool_full")

    def _drop(self, capture: Capture, reason: str) -> None:
        self._remove(capture)
        self.stats.dropped[reason] += 1
        log.warning("capture %s dropped from the spool (%s)", capture.record.capture_id, reason.replace("_", " "))

    def _remove(self, capture: Capture) -> None:
        size = capture.size
        capture.path.unlink(missing_ok=True)
        for image in capture.images:
            image.unlink(missing_ok=True)
        self.stats.waiting -= 1
        self.stats.waiting_bytes -= size

    def _clean(self) -> None:
        """Leftovers of a crash: temporary files, and images whose record was never written or already sent."""
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        recorded = {image.name for capture in self._captures() for image in capture.images}
        for image in self.root.glob("*.jpg"):
            if image.name not in recorded and self._clock() - image.stat().st_mtime > STRAY_AFTER_S:
                image.unlink(missing_ok=True)

    def _recount(self) -> None:
        captures = self._captures()
        self.stats.waiting = len(captures)
        self.stats.waiting_bytes = sum(capture.size for capture in captures)

    def _read_counts(self) -> dict[str, int]:
        try:
            counts = json.loads((self.root / COUNTS).read_bytes())
            return {str(day): int(n) for day, n in counts.items()}
        except (OSError, ValueError, AttributeError):
            return {}
