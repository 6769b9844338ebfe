"""Typed errors raised at the edge where a problem happens.

Each carries one line naming what was wrong and how to fix it; the CLI is the one place that turns
them into that line on stderr and exit code 2. Nothing else catches them to print. A model error also
carries a reason code, so an update reports why a model was refused without checking it again.
"""

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path


class Reason(StrEnum):
    """Why a model or an update was refused: stable codes for dashboards and job statusDetails."""

    MALFORMED_DOCUMENT = "MALFORMED_DOCUMENT"
    UNKNOWN_OPERATION = "UNKNOWN_OPERATION"
    UNSAFE_PATH = "UNSAFE_PATH"
    DOWNGRADE_REFUSED = "DOWNGRADE_REFUSED"
    URL_REFUSED = "URL_REFUSED"
    TOO_LARGE = "TOO_LARGE"
    DOWNLOAD_FAILED = "DOWNLOAD_FAILED"
    SHA256_MISMATCH = "SHA256_MISMATCH"
    UNSIGNED = "UNSIGNED"
    UNTRUSTED_KEY = "UNTRUSTED_KEY"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    INVALID_BUNDLE = "INVALID_BUNDLE"
    NAME_MISMATCH = "NAME_MISMATCH"
    NOT_TFLITE = "NOT_TFLITE"
    TENSOR_MISMATCH = "TENSOR_MISMATCH"
    GOLDEN_ACCURACY = "GOLDEN_ACCURACY"
    MODEL_FAILED = "MODEL_FAILED"
    HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"
    CANDIDATE_STALLED = "CANDIDATE_STALLED"
    NO_FRAMES = "NO_FRAMES"
    INTERRUPTED = "INTERRUPTED"
    STORE_FAILED = "STORE_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


class AgentError(Exception):
    """Base: a problem the user can fix. str(error) is the whole message, one line."""


class ConfigError(AgentError):
    """A setting that is missing, of the wrong type or pointing at something that does not exist."""


class ModelError(AgentError):
    """A model bundle or model file that cannot be trusted, loaded or run; `reason` says which step refused it."""

    def __init__(self, message: str, reason: Reason = Reason.INVALID_BUNDLE):
        super().__init__(message)
        self.reason = reason


class SourceError(AgentError):
    """A frame source (camera, video, folder, stream) that cannot be opened."""


class TransportError(AgentError):
    """A transport that cannot deliver: bad certificate, refused connection, denied topic, oversize payload."""


class OutputError(AgentError):
    """A file a command was told to write (`--out`, `--key`, `--zip`) that cannot be written there."""


@contextmanager
def writing(option: str, path: Path) -> Iterator[None]:
    """Around the writing of `path` (given as `option`): an OSError becomes an OutputError naming both."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write there ({_reason(exc)}); choose a folder you can write to") from None


def _reason(error: OSError) -> str:
    """Why: the OS's words, or, when a file stands where a folder should be, which file."""
    if error.errno in (errno.ENOTDIR, errno.EEXIST) and error.filename:
        failed = Path(error.filename)
        blocker = next((p for p in (failed, *failed.parents) if p.is_file()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    return error.strerror or type(error).__name__


class ProvisioningError(AgentError):
    """Fleet provisioning by claim that could not finish: IoT Core unreachable, or the request rejected."""
