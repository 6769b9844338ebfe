"""Where the agent's log lines go and what they look like: stderr, with time and level, as text or JSON lines.

Configured once, by the CLI, from the `log` settings. Every module logs through
`logging.getLogger(__name__)`; what an operator needs to see (connected, the model served, a job finished,
a backlog draining) is INFO. JSON is one object per line, for journald and CloudWatch: time, level,
logger, message, and the fields an event passed as `extra=` (endpoint, job id, ...).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO

from agent.settings import LogSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries whose faults the agent reports in its own words, shown only at DEBUG: awsiot's IPC client logs
# each failed connection at ERROR, which the agent turns into one line naming the fix.
REPORTED_BY_THE_AGENT = ("awsiot",)
# What every LogRecord carries; anything else on a record came from `extra=` and is the event's own field.
STANDARD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def timestamp(record: logging.LogRecord) -> str:
    """UTC, ISO 8601, milliseconds: sorts as text and reads the same on every device."""
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 -- logging's name
        return timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes in its `exception` field)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": timestamp(record), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update({key: value for key, value in vars(record).items() if key not in STANDARD_FIELDS})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: LogSettings, stream: TextIO | None = None) -> None:
    """The agent's records at `settings.level` and above, to stderr, in `settings.format`; other libraries'
    at WARNING and above (their INFO is chatter), all of them at DEBUG."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else TextFormatter())
    level = logging.getLevelName(settings.level)
    debugging = level == logging.DEBUG
    logging.basicConfig(level=level if debugging else max(level, logging.WARNING), handlers=[handler], force=True)
    logging.getLogger("agent").setLevel(level)
    for name in REPORTED_BY_THE_AGENT:
        logging.getLogger(name).setLevel(logging.NOTSET if debugging else logging.CRITICAL + 1)
