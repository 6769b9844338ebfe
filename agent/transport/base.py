"""The one interface every transport implements, so the pipeline never knows which it talks to."""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass
from typing import ClassVar, Protocol

from agent.errors import TransportError
from agent.messages import Envelope, StatusMessage


@dataclass
class TransportStats:
    """What the transport knows about delivery, for metrics and the status topic."""

    connected: bool = False
    sent: int = 0
    acknowledged: int = 0
    failed: int = 0
    queued: int = 0
    dropped: int = 0
    reconnects: int = 0
    oldest_age_s: float | None = None  # age of the oldest message still queued; None when nothing is


class Transport(ABC):
    """Accepts messages; a networked transport does its I/O on its own threads.

    `publish` is called from the pipeline thread (results, metrics) and from the watchdog and update
    threads (status), so it must be thread-safe, return quickly, and never lose an accepted message (a
    networked transport spools it durably before returning).
    """

    # Whether the far side publishes a last will when the agent vanishes (MQTT): only then is a sequence
    # number spent on one.
    has_last_will: ClassVar[bool] = False

    @abstractmethod
    def start(self, online: StatusMessage, will: StatusMessage | None = None) -> None:
        """Connect (or begin connecting) and announce `online` on the status topic; `will` is the last will."""

    def interrupt(self) -> None:
        """A stop signal arrived: stop waiting for a first connection (start-up carries on, then stops)."""

    @abstractmethod
    def publish(self, message: Envelope) -> None:
        """Accept one message; its `kind` decides the topic."""

    @abstractmethod
    def close(self, offline: StatusMessage, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered and announce `offline`, disconnect: all within `timeout_s`."""

    def stats(self) -> TransportStats:
        return TransportStats()


class PublishRejected(TransportError):
    """The far side refused this message for good (not authorised, too large): drop it and report, never retry."""


class Link(Protocol):
    """One network connection that publishes a message and says when the far side has it.

    Implemented by the MQTT5 client (PUBACK) and the Greengrass IPC client (nucleus spooled it). The
    durable outbox drives a Link from its sender thread; a Link never retries on its own.
    """

    def connect(self, timeout_s: float) -> None:
        """Start connecting; raise TransportError for a fault that retrying cannot fix (bad certificate)."""

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> Future:
        """The future resolves when acknowledged; it fails with PublishRejected for a permanent refusal,
        with another exception for a transient one (disconnected, timed out)."""

    def close(self) -> None: ...
