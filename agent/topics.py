"""Concrete topic names for one thing, checked against AWS IoT Core's topic rules before anything is sent."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import ConfigError
from agent.settings import TopicSettings

MAX_TOPIC_BYTES = 256
MAX_TOPIC_SLASHES = 7  # IoT Core refuses deeper topics (and the Greengrass spooler then retries forever)


def check_topic(topic: str, setting: str) -> str:
    """A topic IoT Core will accept for publishing, or a ConfigError naming the setting."""
    problem = None
    if not topic or len(topic.encode()) > MAX_TOPIC_BYTES:
        problem = f"must be 1 to {MAX_TOPIC_BYTES} bytes"
    elif topic.count("/") > MAX_TOPIC_SLASHES:
        problem = f"has {topic.count('/')} '/' but IoT Core allows at most {MAX_TOPIC_SLASHES}"
    elif "+" in topic or "#" in topic:
        problem = "contains an MQTT wildcard (+ or #), which cannot be published to"
    elif topic.startswith("$"):
        problem = "starts with '$', which IoT Core reserves"
    if problem:
        raise ConfigError(f"topics.{setting} = {topic!r} {problem}; shorten or fix topics.prefix/topics.{setting}")
    return topic


@dataclass(frozen=True)
class Topics:
    inference: str
    status: str
    metrics: str
    commands: str

    @classmethod
    def for_thing(cls, settings: TopicSettings, thing_name: str) -> "Topics":
        def expand(setting: str) -> str:
            template = getattr(settings, setting)
            return check_topic(template.format(prefix=settings.prefix, thing=thing_name), setting)

        return cls(**{name: expand(name) for name in ("inference", "status", "metrics", "commands")})

    def for_kind(self, kind: str) -> str:
        """The topic a message of this kind ('inference', 'status', 'metrics') goes to."""
        return getattr(self, kind)
