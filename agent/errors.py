"""Typed errors raised at the edge where a problem happens.

Each carries one line naming what was wrong and how to fix it; the CLI is the one place that turns
them into that line on stderr and exit code 2. Nothing else catches them to print.
"""


class AgentError(Exception):
    """Base: a problem the user can fix. str(error) is the whole message, one line."""


class ConfigError(AgentError):
    """A setting that is missing, of the wrong type or pointing at something that does not exist."""


class ModelError(AgentError):
    """A model bundle or model file that cannot be trusted, loaded or run."""


class SourceError(AgentError):
    """A frame source (camera, video, folder, stream) that cannot be opened."""


class TransportError(AgentError):
    """A transport that cannot deliver: bad certificate, refused connection, denied topic, oversize payload."""
