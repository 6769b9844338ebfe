"""Requests to IoT Core's device services (Jobs, Shadow) on the SDK's V2 clients: the answer, or an error
that names the request topic and what happened, and a wait that stopping the agent cuts short.

The SDK fails an unanswered request with an exception whose text is empty, which used to end warnings in
"()"; and a request waits up to its timeout (30 s), which used to hold up every stop against a broker that
is not IoT Core. Here a request that got no answer says on which topic and which setting turns the service
off, a refusal carries the service's code, and `close()` ends every wait at once.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from awsiot import V2ServiceException

ANSWER_GRACE_S = 1.0  # the SDK times a request out itself; our own wait allows it this much longer


class RequestFailed(Exception):
    """No answer, or a refusal; `code` is the service's rejection code (a Jobs name, a Shadow HTTP status), if any."""

    def __init__(self, message: str, code: str | int | None = None):
        super().__init__(message)
        self.code = code


class Closing(Exception):
    """The agent is stopping: the answer no longer matters, and the thread asking should end."""


def rejection_code(error: BaseException) -> str | int | None:
    """The service's code in a failed V2 request (TerminalStateReached, VersionMismatch, 404, 409, ...)."""
    return getattr(getattr(error, "modeled_error", None), "code", None)


class ServiceRequests:
    """Waits for the answers of one service client's requests. `service` names it in messages ("IoT Jobs"),
    `setting` is the one that turns it off ("iot.jobs")."""

    def __init__(self, service: str, setting: str, timeout_s: int):
        self.service = service
        self.setting = setting
        self.timeout_s = timeout_s
        self._closed: Future = Future()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    def answer(self, request: Future, topic: str) -> Any:
        """The answer to `request` (published on `topic`); RequestFailed, or Closing once close() was called."""
        wait([request, self._closed], timeout=self.timeout_s + ANSWER_GRACE_S, return_when=FIRST_COMPLETED)
        if self.closed:
            raise Closing
        if not request.done():
            raise self._unanswered(topic)
        try:
            return request.result()
        except V2ServiceException as error:
            code = rejection_code(error)
            if code is not None:
                message = getattr(error.modeled_error, "message", None) or "no message"
                raise RequestFailed(f"{self.service} refused the request on {topic} ({code}: {message})", code) from None
            inner = getattr(error.inner_error, "name", None) or type(error.inner_error).__name__
            if "TIMEOUT" in inner:
                raise self._unanswered(topic) from None
            raise RequestFailed(f"{self.service}: the request on {topic} failed ({inner})") from None

    def close(self) -> None:
        """End every wait, now and later (idempotent)."""
        if not self._closed.done():
            self._closed.set_result(None)

    def _unanswered(self, topic: str) -> RequestFailed:
        return RequestFailed(
            f"{self.service}: no answer to the request on {topic} within {self.timeout_s} s "
            f"(a broker that is not IoT Core, or a policy without these topics? {self.setting}: false turns it off)"
        )
