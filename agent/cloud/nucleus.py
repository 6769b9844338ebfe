"""The agent as a well-behaved Greengrass component: the nucleus as its supervisor.

The component configuration (same names as the settings tree) is merged over the settings at start and
followed live; UpdateState RUNNING / ERRORED; commands from IoT Core; a component update is deferred while
a model swap is in progress. IPC callbacks run on the SDK's threads and only put events on a queue; the
pipeline thread drains it between frames and does every IPC request itself (a request sent from inside a
callback can dead-lock). Its IPC connection is its own, apart from the transport's (agent.transport.greengrass).

That control connection can go: the nucleus ends it with a protocol error, or its socket disappears for a
while. The pipeline thread then reconnects between frames (backing off, for at most
greengrass.wait_for_nucleus_s), subscribes again to everything it followed, and fetches the configuration,
so a change made meanwhile is applied; results keep flowing through the transport's own connection.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable

from awsiot.eventstreamrpc import LifecycleHandler
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2 as Client
from awsiot.greengrasscoreipc.model import (
    QOS,
    ComponentUpdatePolicyEvents,
    ConfigurationUpdateEvents,
    GreengrassCoreIPCError,
    IoTCoreMessage,
    ReportedLifecycleState,
    UnauthorizedError,
)

from agent.bundles.document import Status
from agent.cloud.host import Host
from agent.errors import AgentError, ConfigError, TransportError
from agent.inference.pipeline import Pipeline
from agent.settings import ModelSettings, Settings, deep_merge, validate_settings
from agent.topics import Topics
from agent.transport.greengrass import CONNECT_TIMEOUT_S, NOT_STARTED, open_ipc
from agent.updates.manager import Outcome, UpdateManager

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # a nucleus that does not answer a request in this long is not coming back
RECHECK_AFTER_MS = 5000  # how long a deferred component update waits before the nucleus asks again
RETRY_INITIAL_S, RETRY_MAX_S = 0.5, 5.0  # waits between attempts to reach the nucleus (doubling)
NOT_SETTINGS = {"accessControl"}  # component configuration keys that are the nucleus's, not ours
# What a running agent applies between two frames; any other change waits for the next start.
LIVE = ("source", "model", "topics", "publish_empty", "metrics_interval_s", "greengrass", "shadow")
MODEL_UPDATE = {f"model.{name}" for name in ModelSettings.model_fields} - {"model.score_threshold"}  # a change means a model update


class NucleusGone(TransportError):
    """The control connection closed, or the nucleus stopped answering on it: reconnect."""


class NucleusRefused(TransportError):
    """The nucleus answered a request with one of its errors (aws.greengrass#UnauthorizedError, ServiceError...)."""


def configuration_layer(value: dict[str, Any]) -> dict[str, Any]:
    """The component configuration as a settings layer: the nucleus's own keys left out, and a null
    meaning "not set here" (the recipe leaves device-specific paths to its Run script's flags)."""
    layer = {}
    for key, item in value.items():
        if key in NOT_SETTINGS or item is None:
            continue
        layer[key] = configuration_layer(item) if isinstance(item, dict) else item
    return layer


def nucleus_layer() -> dict[str, Any]:
    """What the nucleus tells every component, as the lowest settings layer: the core device's thing name."""
    thing_name = os.environ.get("AWS_IOT_THING_NAME")
    return {"thing_name": thing_name} if thing_name else {}


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


def ask(client: Client | None, operation: Callable[..., Future], what: str, **request: Any) -> Any:
    """The answer to `operation(client, **request)` (an IPC client method); NucleusRefused naming what the
    nucleus would not do, NucleusGone when there is no connection or no answer."""
    if client is None:
        raise NucleusGone(f"transport greengrass: not connected to the nucleus for {what}")
    try:
        return operation(client, **request).result(timeout=REQUEST_TIMEOUT_S)
    except FutureTimeout:
        raise NucleusGone(f"transport greengrass: the nucleus did not answer {what} within {REQUEST_TIMEOUT_S:g} s") from None
    except GreengrassCoreIPCError as error:
        hint = "; check the recipe's accessControl" if isinstance(error, UnauthorizedError) else ""
        raise NucleusRefused(f"transport greengrass: the nucleus refused {what} ({type(error).__name__}: {error.message}){hint}") from None
    except NOT_STARTED as error:
        raise NucleusGone(f"transport greengrass: lost the IPC connection during {what} ({type(error).__name__}: {error})") from None


class ConnectionWatch(LifecycleHandler):
    """Puts a closed control connection on the host's event queue (on the SDK's thread, so nothing more)."""

    def __init__(self, events: queue.SimpleQueue, connection: int):
        self._events = events
        self._connection = connection

    def on_disconnect(self, reason: Exception | None) -> None:
        self._events.put(("disconnected", (self._connection, reason)))

    def on_error(self, error: Exception) -> bool:
        """A PROTOCOL_ERROR or INTERNAL_ERROR from the nucleus: say so (the disconnect after it only says
        "socket closed"), and end the connection."""
        kind = getattr(error.args[0], "name", "an error") if error.args else "an error"
        self._events.put(("disconnected", (self._connection, ConnectionError(f"the nucleus sent {kind}"))))
        return True


class NucleusHost(Host):
    """The Greengrass nucleus as the agent's supervisor (see agent.app.Host)."""

    def __init__(self, settings: Settings):
        self._client: Client | None = None
        self._connection = 0  # which connection the client is; a ConnectionWatch of an older one is stale
        self._lost_at = self._retry_at = 0.0
        self._retry_s = RETRY_INITIAL_S
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-update")
        self._loading: list[Future] = []  # model updates in order; the first may be running
        self._updates: UpdateManager | None = None
        self._operations: dict[str, Any] = {}
        self._layers: dict[str, Any] = {}
        self._settings = settings
        self._pipeline: Pipeline | None = None

    # -- agent.app.Host --------------------------------------------------------------------------------

    def configure(self, settings: Settings) -> Settings:
        """The component configuration merged over the settings; followed live from here on.

        Only the settings some layer set count: a setting left at its default (thing_name) takes the
        nucleus's value."""
        self._layers = deep_merge(nucleus_layer(), settings.model_dump(exclude_unset=True))
        self._settings = self._fetch_settings()
        return self._settings

    def serving(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._updates = UpdateManager.serving(self._settings, pipeline)
        pipeline.between_frames(self.apply_pending)
        try:
            self._serve_on_connection()
        except NucleusGone as error:
            self._lose(error)

    def failed(self, error: AgentError) -> None:
        try:
            ask(self._client, Client.update_state_async, "UpdateState ERRORED", state=ReportedLifecycleState.ERRORED)
        except TransportError as report_error:  # the nucleus sees our exit code anyway
            log.warning("%s", report_error)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._drop(wait=True)

    # -- the control connection -------------------------------------------------------------------------

    def reach(self) -> None:
        """Connect at start, trying again while the nucleus is not there (it may still be starting)."""
        self._retry_from_now()
        while not self._reconnect():
            time.sleep(max(0.0, self._retry_at - time.monotonic()))
        log.info("connected to the Greengrass nucleus; following the component configuration and component updates")

    def _connect(self) -> None:
        """A new control connection, subscribed to everything the agent follows."""
        self._connection += 1
        self._client = open_ipc(CONNECT_TIMEOUT_S, ConnectionWatch(self._events, self._connection))
        self._subscribe("configuration", Client.subscribe_to_configuration_update_async, ConfigurationUpdateEvents, key_path=[])
        self._subscribe("component-updates", Client.subscribe_to_component_updates_async, ComponentUpdatePolicyEvents)
        if self._pipeline is not None:
            self._serve_on_connection()

    def _serve_on_connection(self) -> None:
        """What a serving agent does on each new connection: follow commands, tell the nucleus it runs."""
        self._subscribe_commands()
        ask(self._client, Client.update_state_async, "UpdateState RUNNING", state=ReportedLifecycleState.RUNNING)

    def _reconnect(self) -> bool:
        """One attempt to connect and subscribe. False when the nucleus cannot be reached (the next attempt is
        scheduled); a TransportError once it has been unreachable for greengrass.wait_for_nucleus_s."""
        try:
            self._connect()
            return True
        except (ConnectionError, NucleusGone) as error:
            self._drop()
            wait_s = self._settings.greengrass.wait_for_nucleus_s
            waited_s = time.monotonic() - self._lost_at
            if waited_s >= wait_s:
                raise TransportError(
                    f"transport greengrass: {error}, for {wait_s:g} s (greengrass.wait_for_nucleus_s); check that the nucleus is running and started this agent"
                ) from None
            if self._retry_s == RETRY_INITIAL_S:
                log.warning("%s; trying again for up to %g s (the nucleus may be starting)", error, wait_s)
            self._retry_at = time.monotonic() + min(self._retry_s, wait_s - waited_s)
            self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)
            return False

    def _lose(self, reason: Exception) -> None:
        """The control connection is gone: close what is left of it and reconnect from now on."""
        log.warning("lost the control connection to the nucleus (%s); reconnecting", reason)
        self._drop()
        self._retry_from_now()

    def _retry_from_now(self) -> None:
        self._lost_at = self._retry_at = time.monotonic()
        self._retry_s = RETRY_INITIAL_S

    def _drop(self, wait: bool = False) -> None:
        operations, self._operations = self._operations, {}
        client, self._client = self._client, None
        for operation in operations.values():
            operation.close()
        if client is not None:
            client.close(executor_wait=wait)

    # -- IPC streams: callbacks only enqueue ------------------------------------------------------------

    def _subscribe(self, name: str, subscribe: Callable, event_type: type, **request: Any) -> None:
        def on_event(event: Any) -> None:
            if isinstance(event, event_type):
                self._events.put((name, event))

        def start(client: Client, **request: Any) -> Future:
            subscribed, self._operations[name] = subscribe(client, on_stream_event=on_event, on_stream_error=lambda error: False, **request)
            return subscribed

        previous = self._operations.pop(name, None)
        if previous is not None:
            previous.close()
        ask(self._client, start, f"the {name} subscription", **request)

    def _subscribe_commands(self) -> None:
        """Commands are a convenience: a refused subscription is reported, and results keep flowing."""
        topic = self._pipeline.transport.topics.commands
        try:
            self._subscribe("commands", Client.subscribe_to_iot_core_async, IoTCoreMessage, topic_name=topic, qos=QOS.AT_LEAST_ONCE)
        except NucleusRefused as error:
            log.warning("no commands will be received: %s", error)

    # -- the pipeline thread --------------------------------------------------------------------------

    def apply_pending(self) -> None:
        """Between two frames: apply what the nucleus sent since the last frame, and a loaded model; and
        while the control connection is gone, try to restore it.

        A configuration change goes first, so an update announced with it sees the model swap it starts."""
        while self._loading and self._loading[0].done():
            self._report_model_update(self._loading.pop(0).result())
        events: dict[str, list] = {"disconnected": [], "configuration": [], "component-updates": [], "commands": []}
        while not self._events.empty():
            kind, event = self._events.get()
            events[kind].append(event)
        for connection, reason in events["disconnected"]:
            if connection == self._connection and self._client is not None:
                self._lose(reason or ConnectionError("closed"))
        for event in events["commands"]:
            self._command(event.message.payload)
        try:
            if self._client is None:
                # What the nucleus announced on the lost connection goes unanswered: it stops waiting after its
                # timeout. The configuration is fetched anew once reconnected.
                if time.monotonic() < self._retry_at or not self._reconnect():
                    return
                log.info("reconnected to the nucleus after %.1f s; resubscribed to configuration, component updates and commands", time.monotonic() - self._lost_at)
                events = {"configuration": [True], "component-updates": []}
            if events["configuration"]:
                self._reconfigure()  # one fetch however many keys a deployment changed
            for event in events["component-updates"]:
                self._answer_component_update(event)
        except NucleusGone as error:
            self._lose(error)

    def _fetch_settings(self) -> Settings:
        value = ask(self._client, Client.get_configuration_async, "GetConfiguration", key_path=[]).value or {}
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
        if "shadow.candidate" in changed and new.shadow.candidate is not None:
            self._start_model_update(new, shadow=True)
        if any(within(name, "source") for name in changed):
            pipeline.replace_source(new.source)  # a source that cannot open is fatal: ERRORED, exit 2
        later = sorted(name for name in changed if not any(within(name, section) for section in LIVE))
        if changed - set(later):
            log.info("configuration applied: %s", ", ".join(sorted(changed - set(later))))
        if later:
            log.warning("configuration %s takes effect when the component restarts", ", ".join(later))

    def _start_model_update(self, settings: Settings, shadow: bool = False) -> None:
        """The update manager verifies, validates, swaps and watches the new model (or, with `shadow`,
        evaluates `shadow.candidate` beside the serving one) on its own thread, while frames keep flowing;
        its outcome is reported between two frames."""
        self._updates.configure(settings.model, settings.tasks, settings.shadow)
        if shadow:
            self._loading.append(self._loader.submit(self._updates.apply_bundle, settings.shadow.candidate, None, self._updates.shadow_plan(None)))
        else:
            self._loading.append(self._loader.submit(self._updates.apply_bundle, settings.model.bundle))

    def _report_model_update(self, outcome: Outcome) -> None:
        pipeline = self._pipeline
        if outcome.shadow is not None and outcome.shadow.state != "promoted":  # the serving model is untouched
            log.log(logging.INFO if outcome.status == Status.SUCCEEDED else logging.WARNING, "shadow evaluation: %s", outcome.message)
            return
        if outcome.status == Status.SUCCEEDED:
            pipeline.transport.publish(pipeline.status("online"))
            return
        log.warning("model not updated, still serving %s %s: %s", pipeline.slot.active.ref.name, pipeline.slot.active.ref.version, outcome.message)
        pipeline.transport.publish(pipeline.status("degraded", reason=outcome.message))

    def _answer_component_update(self, event: ComponentUpdatePolicyEvents) -> None:
        """Defer a restart while a model is loading; otherwise tell the nucleus to go ahead now.

        An answer the nucleus no longer waits for (it went ahead once its timeout passed) changes nothing."""
        pending = event.pre_update_event
        if pending is None:
            return
        answer = dict(message="model swap in progress", recheck_after_ms=RECHECK_AFTER_MS) if self._loading else dict(recheck_after_ms=0)
        try:
            ask(self._client, Client.defer_component_update_async, f"DeferComponentUpdate for deployment {pending.deployment_id}", deployment_id=pending.deployment_id, **answer)
        except NucleusRefused as error:
            log.warning("%s; the nucleus goes on with the deployment", error)

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
    """Registry factory (see agent.app.HOSTS): connects to the nucleus, waiting for it for up to
    greengrass.wait_for_nucleus_s, or fails with one clear line."""
    host = NucleusHost(settings)
    host.reach()
    return host
