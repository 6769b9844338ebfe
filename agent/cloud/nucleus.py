"""The agent as a well-behaved Greengrass component: the nucleus as its supervisor.

The component configuration (same names as the settings tree) is merged over the settings at start and
followed live; UpdateState RUNNING / ERRORED; commands from IoT Core; a component update is deferred while
a model swap is in progress. IPC callbacks run on the SDK's threads and only put events on a queue; the
pipeline thread drains it between frames and does every IPC request itself (a request sent from inside a
callback can dead-lock). Its IPC connection is its own, apart from the transport's (agent.transport.greengrass).
"""

from __future__ import annotations

import json
import logging
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import (
    QOS,
    ComponentUpdatePolicyEvents,
    ConfigurationUpdateEvents,
    GreengrassCoreIPCError,
    IoTCoreMessage,
    ReportedLifecycleState,
)

from agent.bundles.document import Status
from agent.cloud.host import Host
from agent.errors import AgentError, ConfigError, TransportError
from agent.inference.pipeline import Pipeline
from agent.settings import ModelSettings, Settings, deep_merge, validate_settings
from agent.topics import Topics
from agent.transport.greengrass import CONNECT_TIMEOUT_S, CONNECTION_LOST, open_ipc
from agent.updates.manager import Outcome, UpdateManager

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # a nucleus that does not answer a request in this long is not coming back
RECHECK_AFTER_MS = 5000  # how long a deferred component update waits before the nucleus asks again
NOT_SETTINGS = {"accessControl"}  # component configuration keys that are the nucleus's, not ours
# What a running agent applies between two frames; any other change waits for the next start.
LIVE = ("source", "model", "topics", "publish_empty", "metrics_interval_s")
MODEL_UPDATE = {f"model.{name}" for name in ModelSettings.model_fields} - {"model.score_threshold"}  # a change means a model update


def configuration_layer(value: dict[str, Any]) -> dict[str, Any]:
    """The component configuration as a settings layer: the nucleus's own keys left out, and a null
    meaning "not set here" (the recipe leaves device-specific paths to its Run script's flags)."""
    layer = {}
    for key, item in value.items():
        if key in NOT_SETTINGS or item is None:
            continue
        layer[key] = configuration_layer(item) if isinstance(item, dict) else item
    return layer


def changed_settings(old: Settings, new: Settings) -> set[str]:
    """Dotted names of the settings that differ ("model.score_threshold"), one level deep into sections."""
    names = set()
    before, after = old.model_dump(), new.model_dump()
    for key in after:
        if isinstance(after[key], dict):
            names |= {f"{key}.{inner}" for inner in after[key] if after[key][inner] != before[key][inner]}
        elif after[key] != before[key]:
            names.add(key)
    return names


def within(name: str, section: str) -> bool:
    """Whether a dotted setting name is `section` or one of its settings."""
    return name == section or name.startswith(section + ".")


def ask(request: Future, what: str) -> Any:
    """An IPC request's answer, or a TransportError naming what the nucleus did not do."""
    try:
        return request.result(timeout=REQUEST_TIMEOUT_S)
    except FutureTimeout:
        raise TransportError(f"transport greengrass: the nucleus did not answer {what} within {REQUEST_TIMEOUT_S:g} s") from None
    except GreengrassCoreIPCError as error:
        raise TransportError(f"transport greengrass: the nucleus refused {what} ({type(error).__name__}: {error.message}); check the recipe's accessControl") from None
    except CONNECTION_LOST as error:
        raise TransportError(f"transport greengrass: lost the IPC connection during {what} ({error}); the nucleus will restart the agent") from None


class NucleusHost(Host):
    """The Greengrass nucleus as the agent's supervisor (see agent.app.Host)."""

    def __init__(self, client: GreengrassCoreIPCClientV2):
        self._client = client
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-update")
        self._loading: list[Future] = []  # model updates in order; the first may be running
        self._updates: UpdateManager | None = None
        self._operations: dict[str, Any] = {}
        self._layers: dict[str, Any] = {}
        self._settings: Settings | None = None
        self._pipeline: Pipeline | None = None

    # -- agent.app.Host --------------------------------------------------------------------------------

    def configure(self, settings: Settings) -> Settings:
        """The component configuration merged over the settings; followed live from here on."""
        self._layers = settings.model_dump()
        self._subscribe("configuration", self._client.subscribe_to_configuration_update_async, ConfigurationUpdateEvents, key_path=[])
        self._subscribe("component-updates", self._client.subscribe_to_component_updates_async, ComponentUpdatePolicyEvents)
        self._settings = self._fetch_settings()
        return self._settings

    def serving(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._updates = UpdateManager.serving(self._settings, pipeline)
        pipeline.between_frames(self.apply_pending)
        self._subscribe_commands()
        ask(self._client.update_state_async(state=ReportedLifecycleState.RUNNING), "UpdateState RUNNING")

    def failed(self, error: AgentError) -> None:
        try:
            ask(self._client.update_state_async(state=ReportedLifecycleState.ERRORED), "UpdateState ERRORED")
        except TransportError as report_error:  # the nucleus sees our exit code anyway
            log.warning("%s", report_error)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        for operation in self._operations.values():
            operation.close()
        self._client.close()

    # -- IPC streams: callbacks only enqueue ------------------------------------------------------------

    def _subscribe(self, name: str, subscribe: Callable, event_type: type, **request: Any) -> None:
        def on_event(event: Any) -> None:
            if isinstance(event, event_type):
                self._events.put((name, event))

        previous = self._operations.pop(name, None)
        if previous is not None:
            previous.close()
        subscribed, self._operations[name] = subscribe(on_stream_event=on_event, on_stream_error=lambda error: False, **request)
        ask(subscribed, f"the {name} subscription")

    def _subscribe_commands(self) -> None:
        """Commands are a convenience: a refused subscription is reported, and results keep flowing."""
        topic = self._pipeline.transport.topics.commands
        try:
            self._subscribe("commands", self._client.subscribe_to_iot_core_async, IoTCoreMessage, topic_name=topic, qos=QOS.AT_LEAST_ONCE)
        except TransportError as error:
            log.warning("no commands will be received: %s", error)

    # -- the pipeline thread --------------------------------------------------------------------------

    def apply_pending(self) -> None:
        """Between two frames: apply what the nucleus sent since the last frame, and a loaded model.

        A configuration change goes first, so an update announced with it sees the model swap it starts."""
        while self._loading and self._loading[0].done():
            self._report_model_update(self._loading.pop(0).result())
        events: dict[str, list] = {"configuration": [], "component-updates": [], "commands": []}
        while not self._events.empty():
            kind, event = self._events.get()
            events[kind].append(event)
        if events["configuration"]:
            self._reconfigure()  # one fetch however many keys a deployment changed
        for event in events["component-updates"]:
            self._answer_component_update(event)
        for event in events["commands"]:
            self._command(event.message.payload)

    def _fetch_settings(self) -> Settings:
        value = ask(self._client.get_configuration_async(key_path=[]), "GetConfiguration").value or {}
        return validate_settings(deep_merge(self._layers, configuration_layer(value)), origin="component configuration")

    def _reconfigure(self) -> None:
        try:
            new = self._fetch_settings()
            Topics.for_thing(new.topics, new.thing_name)
        except ConfigError as error:
            log.warning("configuration update not applied: %s", error)
            return
        old, self._settings = self._settings, new
        changed = changed_settings(old, new)
        pipeline = self._pipeline
        pipeline.tune(score_threshold=new.model.score_threshold, publish_empty=new.publish_empty, metrics_interval_s=new.metrics_interval_s)
        if any(within(name, "topics") for name in changed):
            pipeline.transport.retarget(Topics.for_thing(new.topics, new.thing_name))
            self._subscribe_commands()
        if changed & MODEL_UPDATE:
            self._start_model_update(new)
        if any(within(name, "source") for name in changed):
            pipeline.replace_source(new.source)  # a source that cannot open is fatal: ERRORED, exit 2
        later = sorted(name for name in changed if not any(within(name, section) for section in LIVE))
        if later:
            log.warning("configuration %s takes effect when the component restarts", ", ".join(later))

    def _start_model_update(self, settings: Settings) -> None:
        """The update manager verifies, validates, swaps and watches the new model on its own thread,
        while frames keep flowing; its outcome is reported between two frames."""
        self._updates.configure(settings.model, settings.tasks)
        self._loading.append(self._loader.submit(self._updates.apply_bundle, settings.model.bundle))

    def _report_model_update(self, outcome: Outcome) -> None:
        pipeline = self._pipeline
        if outcome.status == Status.SUCCEEDED:
            pipeline.transport.publish(pipeline.status("online"))
            return
        log.warning("model not updated, still serving %s %s: %s", pipeline.slot.active.ref.name, pipeline.slot.active.ref.version, outcome.message)
        pipeline.transport.publish(pipeline.status("degraded", reason=outcome.message))

    def _answer_component_update(self, event: ComponentUpdatePolicyEvents) -> None:
        """Defer a restart while a model is loading; otherwise tell the nucleus to go ahead now."""
        pending = event.pre_update_event
        if pending is None:
            return
        if self._loading:
            answer = self._client.defer_component_update_async(deployment_id=pending.deployment_id, message="model swap in progress", recheck_after_ms=RECHECK_AFTER_MS)
        else:
            answer = self._client.defer_component_update_async(deployment_id=pending.deployment_id, recheck_after_ms=0)
        ask(answer, "DeferComponentUpdate")

    def _command(self, payload: bytes) -> None:
        """Commands on topics.commands: {"command": "status"} republishes the status message now."""
        try:
            command = json.loads(payload).get("command")
        except (ValueError, AttributeError):
            command = None
        if command == "status":
            self._pipeline.transport.publish(self._pipeline.status("online"))
        else:
            log.warning("ignored a command that is not {\"command\": \"status\"}: %.80r", payload)


def host_from_settings(settings: Settings) -> NucleusHost:
    """Registry factory (see agent.app.HOSTS): connects to the nucleus or fails with one clear line."""
    try:
        return NucleusHost(open_ipc(CONNECT_TIMEOUT_S))
    except ConnectionError as error:
        raise TransportError(f"transport greengrass: {error}; check that the nucleus is running and started this agent") from None
