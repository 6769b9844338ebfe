"""Bring a model artifact to disk over https with TLS verification.

A device on a poor link must not restart a download from zero, hang forever, or fill its disk: every
transfer has a size limit, connect and read timeouts, retries with exponential backoff, and resumes a
partial file with an HTTP Range request. Plain http is refused unless explicitly allowed.
"""

from __future__ import annotations

import http.client
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from agent.errors import TransportError
from agent.settings import DownloadSettings

CHUNK = 64 * 1024
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}

Progress = Callable[[float], None]  # fraction done, 0..1


class DownloadError(TransportError):
    """The artifact could not be fetched; `code` is the machine-readable reason reported to the cloud."""

    code = "DOWNLOAD_FAILED"


class DownloadRefused(DownloadError):
    """The URL itself is not acceptable (plain http, not a URL): retrying cannot help."""

    code = "URL_REFUSED"


class DownloadTooLarge(DownloadError):
    code = "TOO_LARGE"


class _Retry(Exception):
    """One attempt failed in a way the next attempt may fix."""


def _check_size(size: int, max_bytes: int, where: str) -> None:
    if size > max_bytes:
        raise DownloadTooLarge(f"{where}: artifact is {size} bytes, over the limit of {max_bytes}; raise updates.download.max_mb or ship a smaller bundle")


def fetch(
    source: str,
    dest: Path,
    settings: DownloadSettings,
    *,
    expected_size: int | None = None,
    progress: Progress | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> Path:
    """Download the https URL `source` to `dest`; returns `dest`.

    The bytes land in `dest.part` first, so a retry (or the next run) resumes rather than restarts.
    """
    dest = Path(dest)
    report = progress or (lambda fraction: None)
    limit = settings.max_bytes
    if expected_size is not None:
        _check_size(expected_size, limit, source)
        limit = expected_size
    parts = urlsplit(source)
    if parts.scheme == "http" and not settings.allow_http:
        raise DownloadRefused(f"{source}: plain http is refused (no integrity in transit); use https or set updates.download.allow_http for development")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise DownloadRefused(f"{source}: unsupported URL; the job document must give an https URL")
    context = ssl_context or ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    part = dest.with_name(dest.name + ".part")
    last: Exception | None = None
    for attempt in range(settings.retries + 1):
        if attempt:
            time.sleep(min(settings.backoff_initial_s * 2 ** (attempt - 1), settings.backoff_max_s))
        try:
            _attempt(parts, part, context, settings, limit, expected_size, report)
            os.replace(part, dest)
            return dest
        except (_Retry, OSError, http.client.HTTPException) as exc:
            last = exc
    where = f"{parts.scheme}://{parts.hostname}{parts.path}"
    raise DownloadError(f"{where}: download failed after {settings.retries + 1} attempts ({_describe(last)}); check the URL and the network, then retry the job")


def _describe(exc: Exception | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else type(exc).__name__
    return text


def _attempt(parts, part: Path, context: ssl.SSLContext, settings: DownloadSettings, limit: int, expected_size: int | None, report: Progress) -> None:
    """One GET, resuming from whatever `part` already holds. Raises _Retry (or an I/O error) to try again."""
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=settings.connect_timeout_s, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=settings.connect_timeout_s)
    try:
        connection.connect()
        connection.sock.settimeout(settings.read_timeout_s)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target or "/", headers={"Range": f"bytes={have}-"} if have else {})
        response = connection.getresponse()
        status = response.status
        if status == 416 and have:  # nothing left past what we hold: start over, the part is suspect
            part.unlink()
            raise _Retry("server refused the resume range")
        if status in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {status} {response.reason}")
        if status not in (200, 206):
            raise DownloadError(f"{parts.scheme}://{parts.hostname}{parts.path}: HTTP {status} {response.reason}; the URL is wrong or has expired")
        if status == 200 or not response.getheader("Content-Range", "").startswith(f"bytes {have}-"):
            have = 0  # the server sent the whole file
        length = response.getheader("Content-Length")
        total = have + int(length) if length is not None else expected_size
        if total is not None:
            _check_size(total, settings.max_bytes, f"{parts.scheme}://{parts.hostname}{parts.path}")
            if expected_size is not None and total != expected_size:
                raise DownloadError(f"{parts.scheme}://{parts.hostname}{parts.path}: server has {total} bytes but the update says {expected_size}; fix the document's size or the artifact")
        with open(part, "r+b" if have else "wb") as out:
            out.seek(have)
            out.truncate()
            while block := response.read(CHUNK):
                have += len(block)
                _check_size(have, limit, f"{parts.scheme}://{parts.hostname}{parts.path}")
                out.write(block)
                if total:
                    report(min(have / total, 1.0))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and have < total:
            raise _Retry(f"connection closed after {have} of {total} bytes (truncated)")
    finally:
        connection.close()
