"""A Transport that spools every message to the durable outbox and drains it through any `Link`.

The pipeline thread only encodes, checks and stores (`publish` never touches the network). One sender
thread sends the oldest unsent messages through the Link within the connection's quotas, keeps at most
`max_in_flight` unacknowledged, deletes a message only once the Link says the far side has it, resends
transient failures with exponential backoff, and drops (and counts) what the far side refuses for good.
Nothing here knows MQTT: the Greengrass IPC Link drives the same class.

What a round sends goes out as few publishes as it can: consecutive messages of one topic travel together
as one Batch message (agent.messages), up to `batch_max` of them and IoT Core's payload limit. A publish
costs far more than its bytes on both ends (a round trip through the SDK, a quota token, a billed
message), and each message inside a batch keeps its own id and sequence. Acknowledgement, refusal and
resending work per message: a batch's outcome is each of its messages' outcome.

A thread wake-up costs more CPU than the work it does at a camera's rate, so the sender works in rounds:
while messages are in flight, neither new messages nor acknowledgements wake it; it comes back within
LINGER_S and sends, settles and deletes whatever gathered meanwhile (only a full window or a drain is
woken by acknowledgements). An idle sender is woken by the first new message, so a lone result is not
delayed; a steady stream waits at most LINGER_S longer on its way out.
"""

from __future__ import annotations

import heapq
import logging
import sqlite3
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from agent.errors import ConfigError, TransportError
from agent.messages import BATCH_OVERHEAD, Envelope, StatusMessage, batch_payload
from agent.settings import OutboxSettings
from agent.topics import Topics, check_topic
from agent.transport.base import Link, PublishRejected, Transport, TransportStats
from agent.transport.outbox import Outbox, Spooled

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 128 * 1024  # IoT Core refuses larger payloads
QOS_AT_LEAST_ONCE = 1
FETCH_LIMIT = 256  # messages read from the outbox per query
FRESH_MAX = 1024  # messages handed from publish() to the sender in memory, at most
HOUSEKEEPING_S = 1.0  # how often the sender expires old messages
DELETE_BATCH = 256  # acknowledged messages deleted per outbox transaction, at most
DELETE_DELAY_S = 0.05  # and otherwise on the first round this long after the first of them was acknowledged
LINGER_S = 0.1  # while messages are in flight, new ones wait for the sender's next round, at most this long
LOG_EVERY_S = 10.0  # at most one warning per this interval about dropped messages
OFFLINE_SHARE_S = 1.0  # of close()'s time, what the offline status and the disconnect keep (the drain has the rest)


class RateLimiter:
    """Two token buckets, publishes/s and bytes/s, each one second deep (how IoT Core meters a connection)."""

    def __init__(self, publishes_per_s: float, bytes_per_s: float):
        self.publish_rate, self.byte_rate = publishes_per_s, bytes_per_s
        self.publishes, self.bytes = publishes_per_s, bytes_per_s
        self.updated = time.monotonic()

    def wait_s(self, nbytes: int) -> float:
        """Take one publish of `nbytes` and return 0, or return how long to wait before asking again."""
        now = time.monotonic()
        elapsed, self.updated = now - self.updated, now
        self.publishes = min(self.publish_rate, self.publishes + self.publish_rate * elapsed)
        self.bytes = min(self.byte_rate, self.bytes + self.byte_rate * elapsed)
        if self.publishes < 1 or self.bytes < nbytes:
            return max((1 - self.publishes) / self.publish_rate, (nbytes - self.bytes) / self.byte_rate)
        self.publishes -= 1
        self.bytes -= nbytes
        return 0.0


def publishes(due: list[Spooled], batch_max: int) -> list[list[Spooled]]:
    """A round's messages, oldest first, as publishes: runs of one topic and QoS, each at most `batch_max`
    messages and, batched, within IoT Core's payload limit."""
    groups: list[list[Spooled]] = []
    size = 0
    for item in due:
        group = groups[-1] if groups else None
        grown = size + 1 + len(item.payload)  # a comma, then the message
        if group and item.topic == group[0].topic and item.qos == group[0].qos and len(group) < batch_max and grown <= MAX_PAYLOAD_BYTES:
            group.append(item)
            size = grown
        else:
            groups.append([item])
            size = BATCH_OVERHEAD + len(item.payload)
    return groups


def describe(error: BaseException | None) -> str:
    """An exception as words even when its message is empty (a timeout's is): awscrt's error name, else its text."""
    if error is None:
        return "no reason given"
    if isinstance(error, (TimeoutError, FutureTimeout)):
        return "no acknowledgement in time"
    return getattr(error, "name", None) or str(error) or type(error).__name__


def refusal(topic: str, payload: bytes, kind: str) -> str | None:
    """Why IoT Core would refuse this publish, checked before it is stored or sent; None if it is fine."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        return f"{kind} message of {len(payload)} bytes exceeds IoT Core's {MAX_PAYLOAD_BYTES}-byte payload limit"
    try:
        check_topic(topic, kind)
    except ConfigError as error:
        return str(error)
    return None


class SpooledTransport(Transport):
    """Outbox in front, one sender thread behind, any Link at the far end (MQTT5, Greengrass IPC)."""

    def __init__(self, link: Link, topics: Topics, outbox: Outbox, settings: OutboxSettings, connect_timeout_s: float = 10.0):
        self.link = link
        self.topics = topics
        self.outbox = outbox
        self.settings = settings
        self.connect_timeout_s = connect_timeout_s
        self._limiter = RateLimiter(settings.max_publishes_per_s, settings.max_bytes_per_s)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._draining = False
        # What publish() just stored, handed to the sender in memory so that keeping up costs no disk read.
        # The outbox stays the truth: the sender reads it whenever ids are missing here (backlog, overflow).
        self._fresh: deque[Spooled] = deque()
        self._done: deque[tuple[list[Spooled], Future]] = deque()  # appended by the Link's threads, drained by the sender
        self._in_flight: dict[int, Spooled] = {}
        self._retry: list[tuple[int, Spooled]] = []  # heap by id: resend oldest first
        self._retry_at = 0.0
        self._backoff_s = settings.retry_initial_s
        self._stats = TransportStats()
        self._quiet_until = 0.0
        self._finished: list[int] = []  # acknowledged or refused, not yet deleted from the outbox
        self._finished_since = 0.0
        self._was_connected = False  # as the sender last saw the link: a (re)connection with a backlog is logged
        self._sender = threading.Thread(target=self._send_loop, name="outbox-sender", daemon=True)

    # -- pipeline side ------------------------------------------------------------------------------

    def retarget(self, topics: Topics) -> None:
        """Publish to these topics from now on (a live configuration change); messages already spooled keep theirs."""
        self.topics = topics

    def start(self, online: StatusMessage, will: StatusMessage | None = None) -> None:
        try:
            self.link.connect(self.connect_timeout_s)
        except BaseException:
            self.outbox.close()  # this agent will not run: another may use the outbox
            raise
        self.announce(online)
        self._sender.start()

    def publish(self, message: Envelope) -> None:
        """Check, encode and spool one message; returns once it is committed to the outbox.

        A status message is the current state, not history: it goes straight to the Link, retained."""
        if isinstance(message, StatusMessage):
            self.announce(message)
            return
        topic = self.topics.for_kind(message.kind)
        payload = message.to_json_bytes()
        problem = refusal(topic, payload, message.kind)
        if problem:
            self._refused(problem)
            return
        try:
            message_id = self.outbox.put(topic, QOS_AT_LEAST_ONCE, payload)
        except TransportError as error:  # a full disk: the message was never accepted; keep serving, report it
            self._refused(str(error))
            return
        if len(self._fresh) < FRESH_MAX:
            self._fresh.append(Spooled(message_id, topic, QOS_AT_LEAST_ONCE, payload))
        if not self._in_flight and not self._wake.is_set():  # a busy sender comes back within LINGER_S anyway
            self._wake.set()

    def announce(self, status: StatusMessage) -> None:
        """Publish a status retained on the status topic, bypassing the outbox (a stale status is worthless)."""
        future = self._publish_status(status)
        future.add_done_callback(lambda f: f.exception() and log.warning("status %s not delivered on %s: %s", status.state, self.topics.status, describe(f.exception())))

    def _publish_status(self, status: StatusMessage) -> Future:
        return self.link.publish(self.topics.status, status.to_json_bytes(), QOS_AT_LEAST_ONCE, retain=True)

    def close(self, offline: StatusMessage, timeout_s: float = 5.0) -> None:
        """Deliver what the outbox holds, announce `offline` and disconnect, all within `timeout_s`.

        Only a connected link is worth waiting for; whatever is still undelivered stays in the outbox for the
        next start, and a link that was lost has had its last will published instead of `offline`."""
        deadline = time.monotonic() + timeout_s
        backlog = self.outbox.stats().depth
        if not self.link.connected:
            log.warning("stopping while disconnected: %d messages wait in the outbox for the next start; the last will says offline", backlog)
        else:
            if self._sender.is_alive():
                if backlog:
                    log.info("stopping: outbox draining %d messages for up to %.1f s", backlog, max(0.0, timeout_s - OFFLINE_SHARE_S), extra={"messages": backlog})
                self._draining = True
                self._wake.set()
                self._idle.wait(max(0.0, deadline - OFFLINE_SHARE_S - time.monotonic()))
            try:
                self._publish_status(offline).result(timeout=max(0.0, deadline - OFFLINE_SHARE_S / 2 - time.monotonic()))
            except Exception as error:  # noqa: BLE001 -- best effort on the way out
                log.warning("offline status not delivered (%s); the broker publishes the last will instead", describe(error))
        self._stop.set()
        self._wake.set()
        if self._sender.is_alive():
            self._sender.join()
        self.link.close()
        self.outbox.close()

    def stats(self) -> TransportStats:
        spooled = self.outbox.stats()
        stats = self._stats
        return TransportStats(
            connected=self.link.connected,
            sent=stats.sent,
            acknowledged=stats.acknowledged,
            failed=stats.failed,
            queued=spooled.depth,
            dropped=stats.dropped + spooled.evicted,
            reconnects=self.link.reconnects,
            oldest_age_s=None if spooled.oldest_created is None else max(0.0, time.time() - spooled.oldest_created),
        )

    def _refused(self, problem: str) -> None:
        self._stats.failed += 1
        self._stats.dropped += 1
        now = time.monotonic()
        if now >= self._quiet_until:  # one line per LOG_EVERY_S: a persistent fault must not flood the log
            log.warning("dropped a message: %s (%d dropped so far)", problem, self._stats.dropped)
            self._quiet_until = now + LOG_EVERY_S

    # -- sender thread ------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        cursor = 0  # highest outbox id handed to the Link this run; a restart begins again at the oldest
        self._next_sync = self._next_housekeeping = time.monotonic()
        while not self._stop.is_set():
            try:
                cursor = self._step(cursor)
            except sqlite3.Error as error:  # a disk fault must not kill the sender: wait and try again
                log.warning("outbox %s: %s; retrying", self.outbox.path, error)
                self._stop.wait(HOUSEKEEPING_S)
        self._settle(flush=True)

    def _step(self, cursor: int) -> int:
        """One round: settle acknowledgements, housekeeping, send what the window and quotas allow, or wait."""
        self._wake.clear()
        self._settle()
        self._notice_connection()
        now = time.monotonic()
        if now >= self._next_housekeeping:
            self.outbox.expire()
            self._next_housekeeping = now + HOUSEKEEPING_S
        if now >= self._next_sync:  # bounds what a power cut can take (synchronous=normal) and the WAL's size
            self.outbox.sync()
            self._next_sync = now + self.settings.sync_interval_s
        due = self._due(cursor, now)
        pause_s = LINGER_S if self._in_flight else DELETE_DELAY_S if self._finished else HOUSEKEEPING_S
        if due is None:  # waiting out a backoff or a full window
            self._wake.wait(max(0.001, min(self._retry_at - now, pause_s)) if self._retry_at > now else pause_s)
            return cursor
        if not due:
            if not self._in_flight and not self._retry:
                self._settle(flush=True)
                if self._draining:
                    self._idle.set()
            self._wake.wait(pause_s)
            return cursor
        for group in publishes(due, self.settings.batch_max):
            self._send(group)
        return max(cursor, due[-1].id)

    def _notice_connection(self) -> None:
        """A link that has just come up (at start, or after an outage) with messages waiting: say how many."""
        connected = self.link.connected
        if connected and not self._was_connected:
            backlog = self.outbox.stats().depth
            if backlog:
                log.info("outbox draining %d messages", backlog, extra={"messages": backlog})
        self._was_connected = connected

    def _due(self, cursor: int, now: float) -> list[Spooled] | None:
        """Retries first (oldest first), then what the outbox holds past the cursor; None = wait."""
        room = self.settings.max_in_flight - len(self._in_flight)
        if room <= 0 or (self._retry and now < self._retry_at):
            return None
        if self._retry:
            return [heapq.heappop(self._retry)[1] for _ in range(min(room, len(self._retry)))]
        fresh = self._fresh
        while fresh and fresh[0].id <= cursor:  # already read from disk
            fresh.popleft()
        due = []
        while fresh and len(due) < room and fresh[0].id == cursor + 1 + len(due):
            due.append(fresh.popleft())
        if due or self.outbox.last_id <= cursor:
            return due
        return self.outbox.after(cursor, min(room, FETCH_LIMIT))  # a backlog, or messages _fresh had no room for

    def _send(self, group: list[Spooled]) -> None:
        """One publish: a message alone, or several of one topic as a Batch."""
        first = group[0]
        payload = first.payload if len(group) == 1 else batch_payload([item.payload for item in group])
        while (wait_s := self._limiter.wait_s(len(payload))) > 0:
            if self._stop.wait(wait_s):
                for item in group:
                    heapq.heappush(self._retry, (item.id, item))
                return
        for item in group:
            self._in_flight[item.id] = item
        self._stats.sent += len(group)
        try:
            future = self.link.publish(first.topic, payload, first.qos)
        except Exception as error:  # noqa: BLE001 -- a Link that fails synchronously is treated like a failed future
            future = Future()
            future.set_exception(error)
        future.add_done_callback(lambda f, group=group: self._finish(group, f))

    def _finish(self, group: list[Spooled], future: Future) -> None:
        """On the Link's thread: hand the outcome to the sender, waking it only if nothing else will.

        A full window or a drain cannot go on without acknowledgements; otherwise the sender settles them on
        its next round, at most LINGER_S away. The window counts a message until the sender has settled it,
        so a sender that found it full is always woken."""
        self._done.append((group, future))
        if (self._draining or len(self._in_flight) >= self.settings.max_in_flight) and not self._wake.is_set():
            self._wake.set()

    def _settle(self, flush: bool = False) -> None:
        """Act on acknowledgements: delete the acknowledged and the refused, schedule the rest for a resend.

        Deletions are committed in batches (DELETE_BATCH ids, or DELETE_DELAY_S after the first): a crash in
        between only means those messages are sent once more, which QoS1 receivers expect anyway."""
        finished, transient = self._finished, False
        while self._done:
            group, future = self._done.popleft()
            error = future.exception()
            for item in group:
                self._in_flight.pop(item.id, None)
                if error is None:
                    finished.append(item.id)
                    self._stats.acknowledged += 1
                    self._backoff_s = self.settings.retry_initial_s
                elif isinstance(error, PublishRejected):
                    finished.append(item.id)
                    self._refused(f"{item.topic}: {error}")
                else:
                    heapq.heappush(self._retry, (item.id, item))
                    transient = True
        if transient:  # one backoff step per round of failures, however many messages failed together
            self._retry_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.settings.retry_max_s)
        if finished and not self._finished_since:
            self._finished_since = time.monotonic()
        if finished and (flush or len(finished) >= DELETE_BATCH or time.monotonic() - self._finished_since >= DELETE_DELAY_S):
            self.outbox.remove(finished)
            self._finished, self._finished_since = [], 0.0
