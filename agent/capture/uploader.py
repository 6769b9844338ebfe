"""The uploader: captures go from the spool to S3, oldest first, on their own thread.

Each capture's images go first, then its record (what `edge-fleet data pull` looks for), each under its
capture id, so a repeated upload replaces the same objects. A capture leaves the spool only once all of it is
in S3. Any failure (no network, credentials refused, S3 refusing) ends the round: the uploader waits, doubling
the wait up to `retry_max_s`, and starts again from the oldest capture still waiting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from agent.capture.spool import Capture, CaptureSpool
from agent.errors import AgentError
from agent.settings import CaptureSettings

log = logging.getLogger(__name__)

IDLE_S = 60.0  # with nothing to send, look again this often (captures past their age are dropped then)
UPLOAD_ERRORS = (BotoCoreError, ClientError, AgentError, OSError)


class Uploader:
    """Sends the spool's captures to `bucket` with an S3 client `make_client` builds (on this thread, lazily)."""

    def __init__(self, spool: CaptureSpool, settings: CaptureSettings, make_client: Callable[[], Any], prefix: str = "captures"):
        self.spool = spool
        self.bucket = settings.bucket
        self.settings = settings
        self.prefix = prefix
        self._make_client = make_client
        self._client: Any = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capture-upload", daemon=True)

    def start(self) -> Uploader:
        self._thread.start()
        return self

    def wake(self) -> None:
        """A capture was added: send it now rather than at the next idle check."""
        self._wake.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop after the object being sent; what is left waits in the spool for the next run."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        delay = self.settings.retry_initial_s
        failing = False
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.send_waiting()
            except UPLOAD_ERRORS as exc:
                self.spool.stats.upload_failures += 1
                if not failing:  # once per outage, not once per retry
                    log.warning("capture upload to s3://%s paused: %s; retrying with backoff, captures wait in the spool", self.bucket, _one_line(exc))
                failing = True
                self._client = None if isinstance(exc, AgentError) else self._client
                self._stop.wait(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
                continue
            if failing:
                log.info("capture upload to s3://%s resumed", self.bucket)
            failing, delay = False, self.settings.retry_initial_s
            self._wake.wait(IDLE_S)

    def send_waiting(self) -> int:
        """Send every waiting capture, oldest first; how many were sent. Raises on the first failure."""
        sent = 0
        for capture in self.spool.waiting():
            if self._stop.is_set():
                break
            self.send(capture)
            sent += 1
        return sent

    def send(self, capture: Capture) -> None:
        if self._client is None:
            self._client = self._make_client()
        prefix = capture.record.key_prefix(self.prefix)
        size = 0
        for path in capture.images:
            data = path.read_bytes()
            self._client.put_object(Bucket=self.bucket, Key=f"{prefix}/{path.name}", Body=data, ContentType="image/jpeg")
            size += len(data)
        data = capture.path.read_bytes()
        self._client.put_object(Bucket=self.bucket, Key=f"{prefix}/{capture.path.name}", Body=data, ContentType="application/json")
        self.spool.sent(capture, size + len(data))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
