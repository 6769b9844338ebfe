"""Standalone on IoT Core: model updates through IoT Jobs and settings through the Device Shadow.

The agent.app Host when the `iot` settings turn either on (transport mqtt). Everything rides on the
transport's own MQTT5 connection; nothing starts until the pipeline is built, and with Jobs on, the store's
model is put in service before the first frame. Closing is prompt whatever the cloud does: requests still
waiting for an answer are abandoned.
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
        settings, iot = self.settings, self.settings.iot
        client = pipeline.transport.link.client
        if iot.shadow:
            self.shadow = DeviceShadow(client, settings.thing_name, pipeline, timeout_s=iot.request_timeout_s)
        if iot.jobs:
            self.jobs = self._job_runner(pipeline, client)
        for part in (self.shadow, self.jobs):
            if part is not None:
                part.start()

    def _job_runner(self, pipeline: Pipeline, client) -> JobRunner:
        """Jobs drive the update manager, whose store may hold a model an earlier job installed: it serves now."""
        settings = self.settings
        manager = UpdateManager.serving(settings, pipeline)
        announce = lambda *_: pipeline.transport.publish(pipeline.status("online"))  # noqa: E731 -- the retained status names the model in use
        if manager.restore() is not None:
            announce()
        jobs = JobRunner(client, settings.thing_name, manager, timeout_s=settings.iot.request_timeout_s)
        if self.shadow is not None:
            jobs.listeners.append(self.shadow.on_outcome)
        jobs.listeners.append(announce)
        return jobs

    def close(self) -> None:
        for part in (self.jobs, self.shadow):
            if part is not None:
                part.close()


def host_from_settings(settings: Settings) -> IotCoreHost:
    """Registry factory (see agent.app.HOSTS)."""
    return IotCoreHost(settings)
