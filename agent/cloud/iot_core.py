"""Standalone on IoT Core: model updates through IoT Jobs and settings through the Device Shadow.

The agent.app Host for the mqtt transport. Everything rides on the transport's own MQTT5 connection;
nothing starts until the pipeline is built, and the store's model is put in service before the first frame.
"""

from __future__ import annotations

from agent.cloud.host import Host
from agent.cloud.jobs import JobRunner
from agent.cloud.shadow import DeviceShadow
from agent.inference.pipeline import Pipeline
from agent.settings import Settings
from agent.updates.manager import UpdateManager


class IotCoreHost(Host):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.jobs: JobRunner | None = None
        self.shadow: DeviceShadow | None = None

    def serving(self, pipeline: Pipeline) -> None:
        settings = self.settings
        manager = UpdateManager.serving(settings, pipeline)
        announce = lambda *_: pipeline.transport.publish(pipeline.status("online"))  # noqa: E731 -- the retained status names the model in use
        if manager.restore() is not None:
            announce()
        client = pipeline.transport.link.client
        self.shadow = DeviceShadow(client, settings.thing_name, pipeline)
        self.jobs = JobRunner(client, settings.thing_name, manager)
        self.jobs.listeners += [self.shadow.on_outcome, announce]
        self.shadow.start()
        self.jobs.start()

    def close(self) -> None:
        for part in (self.jobs, self.shadow):
            if part is not None:
                part.close()


def host_from_settings(settings: Settings) -> IotCoreHost:
    """Registry factory (see agent.app.HOSTS)."""
    return IotCoreHost(settings)
