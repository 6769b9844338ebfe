"""Results as JSON lines on stdout (status and metrics on stderr): the transport for demos and pipes."""

from __future__ import annotations

import sys
from typing import TextIO

from agent.messages import Envelope, InferenceResult, StatusMessage
from agent.transport.base import Transport, TransportStats


class ConsoleTransport(Transport):
    def __init__(self, out: TextIO = sys.stdout, side: TextIO = sys.stderr):
        self._out = out
        self._side = side
        self._stats = TransportStats(connected=True)

    def start(self, online: StatusMessage, will: StatusMessage | None = None) -> None:
        self.publish(online)

    def publish(self, message: Envelope) -> None:
        stream = self._out if isinstance(message, InferenceResult) else self._side
        stream.write(message.model_dump_json(exclude_none=True) + "\n")
        stream.flush()
        self._stats.sent += 1
        self._stats.acknowledged += 1

    def close(self, offline: StatusMessage, timeout_s: float = 5.0) -> None:
        self.publish(offline)

    def stats(self) -> TransportStats:
        return self._stats


def from_settings(settings, topics) -> ConsoleTransport:
    """Registry factory (see agent.app.TRANSPORTS); the console needs no settings."""
    return ConsoleTransport()
