"""What the agent runs under: the base every host (IoT Core Jobs + Shadow, the Greengrass nucleus) extends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.settings import Settings

if TYPE_CHECKING:
    from agent.inference.pipeline import Pipeline


class Host:
    """What the agent runs under. On its own: nothing, so every method does nothing. Under Greengrass:
    the nucleus, which configures the agent, changes that configuration live, and wants to hear whether
    the agent serves or failed (agent.cloud.nucleus.NucleusHost)."""

    def configure(self, settings: Settings) -> Settings:
        """The settings to run with, given the ones from defaults, file, environment and flags."""
        return settings

    def serving(self, pipeline: Pipeline) -> None:
        """The pipeline is built and the transport started; it serves from now on."""

    def failed(self, error: AgentError) -> None:
        """The agent is stopping on a fault it cannot get past."""

    def close(self) -> None: ...
