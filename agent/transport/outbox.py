"""The durable spool between the pipeline and the network: a message is on disk before it is sent and
leaves the disk only when the far side has acknowledged it.

SQLite in WAL mode, one table in arrival order. What "accepted" means, precisely:

- `put` returns after its INSERT is committed to the write-ahead log (the write() has returned). From then
  on the message survives a crash, an exception or a SIGKILL of the agent: the next start resends it.
- With `synchronous="normal"` (the default) the WAL is fsynced at every checkpoint, and the sender runs one
  (`sync`, on its own connection, never on the pipeline thread) every `sync_interval_s`; a power cut (or kernel panic) can therefore lose the messages accepted
  in the last `sync_interval_s` (1 s by default), never older ones, and never corrupts the spool. This is
  what lets the pipeline thread accept thousands of results per second on an SD card.
- With `synchronous="full"` every `put` waits for its own fsync: nothing accepted is lost even on power
  loss, at the price of one fsync per message (a few hundred per second on typical flash).

A deletion lost to a power cut only means a message is sent twice, which QoS1 receivers handle anyway
(they de-duplicate on message_id). The spool is bounded by bytes and by age; past either bound the oldest
messages are dropped and counted, never blocking the pipeline and never growing without limit.

One process at a time: an outbox holds an exclusive lock (flock on `PATH.lock`, released by the kernel
however the process ends) while it is open, so a second agent started on the same outbox refuses to
start instead of sending the same messages again.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from agent.errors import TransportError
from agent.settings import OutboxSettings

ROW_OVERHEAD = 48  # bytes SQLite spends per row besides the payload and topic (rowid, header, cell pointer)
MAX_SQL_VARIABLES = 32766  # SQLite's limit on ? per statement
EVICT_FRACTION = 0.01  # when full, free this share of the bound at once so eviction is not paid per message

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so the sender's cursor only moves forward
    created REAL NOT NULL,
    topic TEXT NOT NULL,
    qos INTEGER NOT NULL,
    payload BLOB NOT NULL
)
"""


@dataclass(frozen=True)
class Spooled:
    """One message waiting for its acknowledgement; `id` orders messages oldest first."""

    id: int
    topic: str
    qos: int
    payload: bytes

    @property
    def size(self) -> int:
        return stored_size(self.topic, self.payload)


def stored_size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic) + ROW_OVERHEAD


@dataclass
class OutboxStats:
    depth: int = 0
    bytes: int = 0
    evicted_full: int = 0
    evicted_old: int = 0
    oldest_created: float | None = None  # time.time() when the oldest waiting message was accepted

    @property
    def evicted(self) -> int:
        return self.evicted_full + self.evicted_old


class Outbox:
    """A bounded, crash-safe FIFO of (topic, qos, payload), shared by the pipeline thread and the sender.

    One connection behind one lock: statements are microseconds long, and a Python lock never sleeps the
    way SQLite's busy handler does.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age_s: float,
        synchronous: Literal["normal", "full"] = "normal",
    ):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._owner: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = claim(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA journal_size_limit=8388608")  # truncate the WAL back to 8 MiB after checkpoints
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # `sync` checkpoints off the pipeline thread instead
            self._db.execute(SCHEMA)
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            depth, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload) + length(topic)), 0) FROM outbox"
            ).fetchone()
        except (OSError, sqlite3.Error) as exc:
            self._release()
            raise TransportError(f"outbox.path {self.path}: cannot open the spool ({exc}); point it at a writable file") from None
        self._stats = OutboxStats(depth=depth, bytes=size + depth * ROW_OVERHEAD)
        self.last_id = self._db.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'outbox'").fetchone()[0]

    def put(self, topic: str, qos: int, payload: bytes) -> int:
        """Store one message and return its id, once committed (see the module docstring for what that survives).

        Ids are consecutive: each put gets the previous one's id + 1 (AUTOINCREMENT, one writer)."""
        size = stored_size(topic, payload)
        with self._lock:
            try:
                if self._stats.bytes + size > self.max_bytes:
                    self._evict_oldest(self._stats.bytes + size - self.max_bytes + int(self.max_bytes * EVICT_FRACTION))
                message_id = self._db.execute(
                    "INSERT INTO outbox (created, topic, qos, payload) VALUES (?, ?, ?, ?)", (time.time(), topic, qos, payload)
                ).lastrowid
            except sqlite3.Error as exc:
                raise TransportError(f"outbox.path {self.path}: cannot store a message ({exc}); free disk space or point outbox.path elsewhere") from None
            self._stats.depth += 1
            self._stats.bytes += size
            self.last_id = message_id
        return message_id

    def after(self, last_id: int, limit: int) -> list[Spooled]:
        """Up to `limit` messages newer than `last_id`, oldest first (what the sender has not sent yet)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, qos, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (last_id, limit)
            ).fetchall()
        return [Spooled(*row) for row in rows]

    def remove(self, ids: Iterable[int]) -> None:
        """Forget acknowledged (or refused) messages; an id already evicted is ignored."""
        ids = list(ids)
        with self._lock:
            for start in range(0, len(ids), MAX_SQL_VARIABLES):
                chunk = ids[start : start + MAX_SQL_VARIABLES]
                freed = [size for (size,) in self._db.execute(
                    f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(chunk))}) RETURNING length(payload) + length(topic)", chunk
                )]
                self._forget(freed)

    def expire(self, now: float | None = None) -> int:
        """Drop messages older than max_age_s (checked from the oldest end, so it costs nothing when none are)."""
        cutoff = (now if now is not None else time.time()) - self.max_age_s
        with self._lock:
            oldest = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
            if oldest is None or oldest[0] >= cutoff:
                return 0
            freed = [size for (size,) in self._db.execute(
                "DELETE FROM outbox WHERE created < ? RETURNING length(payload) + length(topic)", (cutoff,)
            )]
            self._forget(freed)
            self._stats.evicted_old += len(freed)
        return len(freed)

    def sync(self) -> None:
        """Make everything accepted so far survive a power cut (a checkpoint fsyncs the WAL first).

        Runs on its own connection: a checkpoint works alongside the writer, so `put` never waits on it."""
        self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = self._db.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
            return OutboxStats(**{**vars(self._stats), "oldest_created": oldest[0] if oldest else None})

    def close(self) -> None:
        with self._lock:
            self._checkpointer.close()
            self._db.close()
            self._release()

    def _release(self) -> None:
        """Give up the lock: another agent may open the outbox now."""
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    def _evict_oldest(self, nbytes: int) -> None:
        """Drop the oldest messages until `nbytes` are freed (called with the lock held)."""
        average = self._stats.bytes / self._stats.depth if self._stats.depth else 1
        freed = [size for (size,) in self._db.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?) RETURNING length(payload) + length(topic)",
            (max(1, math.ceil(nbytes / average)),),
        )]
        self._forget(freed)
        self._stats.evicted_full += len(freed)

    def _forget(self, freed: list[int]) -> None:
        self._stats.depth -= len(freed)
        self._stats.bytes -= sum(freed) + ROW_OVERHEAD * len(freed)


def claim(path: Path) -> int:
    """Lock `path` for this process (an open descriptor of PATH.lock holding flock); TransportError naming the
    process that holds it already."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise TransportError(
            f"outbox.path {path}: another edge-agent (pid {holder}) is using this outbox; stop it, or give this agent "
            "its own outbox.path (and, to stay connected, its own thing_name)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def open_outbox(settings: OutboxSettings) -> Outbox:
    return Outbox(settings.path, max_bytes=int(settings.max_mb * 1024 * 1024), max_age_s=settings.max_age_s, synchronous=settings.synchronous)
