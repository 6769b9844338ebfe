"""IoT Core through the Greengrass nucleus: `IpcLink` publishes through PublishToIoTCore, and the durable
outbox drives it like the MQTT5 client. The component's lifecycle side is agent.cloud.nucleus, on an IPC
connection of its own (the nucleus authenticates every connection with SVCUID).
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import awsiot.greengrasscoreipc
from awscrt.exceptions import AwsCrtError
from awsiot.eventstreamrpc import (
    AccessDeniedError,
    ConnectionClosedError,
    EventStreamError,
    LifecycleHandler,
    StreamClosedError,
)
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import (
    QOS,
    GreengrassCoreIPCError,
    InvalidArgumentsError,
    UnauthorizedError,
)

from agent.errors import TransportError
from agent.settings import Settings
from agent.topics import Topics
from agent.transport.base import PublishRejected
from agent.transport.outbox import open_outbox
from agent.transport.spooled import SpooledTransport

log = logging.getLogger(__name__)
logging.getLogger("awsiot").addHandler(logging.NullHandler())  # its connect errors become our one line

CONNECT_TIMEOUT_S = 10.0
CONNECTION_LOST = (ConnectionClosedError, StreamClosedError, EventStreamError, AwsCrtError)
# A request started on a connection that has just closed, before the SDK noticed, fails in awscrt with a
# plain RuntimeError (AWS_ERROR_EVENT_STREAM_RPC_CONNECTION_CLOSED) instead of any of the above.
NOT_STARTED = (*CONNECTION_LOST, RuntimeError)


def open_ipc(timeout_s: float, lifecycle: LifecycleHandler | None = None) -> GreengrassCoreIPCClientV2:
    """A connected IPC client. TransportError when this is not a component or the nucleus refuses it;
    ConnectionError when the nucleus cannot be reached right now (no socket yet, nobody listening, no answer).
    `lifecycle` hears, on the SDK's thread, when the connection closes."""
    try:
        connection = awsiot.greengrasscoreipc.connect(timeout=timeout_s, lifecycle_handler=lifecycle)
    except KeyError as missing:
        raise TransportError(
            f"transport greengrass: {missing.args[0]} is not set; this transport runs only when a Greengrass nucleus "
            "starts the agent from its recipe (use --transport mqtt or console elsewhere)"
        ) from None
    except AccessDeniedError:
        raise _refused() from None
    except AwsCrtError as error:
        if error.name == "AWS_IO_SOCKET_CLOSED":  # the nucleus hung up on our CONNECT: it refused the token
            raise _refused() from None
        raise ConnectionError(f"cannot reach the Greengrass nucleus at {_socket()} ({error.name}: {error.message})") from None
    except RuntimeError as error:  # awscrt refuses a missing socket file or one nobody listens on at once, untyped:
        name_and_message = re.sub(r"^\d+ \((\w+)\): ", r"\1: ", str(error))  # "1047 (AWS_IO_...): socket ..."
        raise ConnectionError(f"cannot reach the Greengrass nucleus at {_socket()} ({name_and_message})") from None
    except FutureTimeout:
        raise ConnectionError(f"the Greengrass nucleus at {_socket()} did not answer the IPC handshake within {timeout_s:g} s") from None
    # Callbacks run on this single thread, in order; they only enqueue, so one is plenty.
    return GreengrassCoreIPCClientV2(client=connection, executor=ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipc-events"))


def _socket() -> str:
    return os.environ["AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"]


def _refused() -> TransportError:
    return TransportError(
        "transport greengrass: the nucleus refused the IPC connection (SVCUID is not a valid token for this component); "
        "let the nucleus start the agent from its recipe instead of starting it by hand"
    )


class IpcLink:
    """PublishToIoTCore as a Link: acknowledged once the nucleus has spooled the message for IoT Core.

    A connection the nucleus dropped is reopened on the next publish; a refusal (topic not in the
    component's accessControl) fails the message for good with PublishRejected. A ServiceError (the
    nucleus's spool is full, its MQTT client timed out) is transient: the outbox keeps the message and
    sends it again; the first of a run is logged, and when the nucleus takes messages again.
    """

    def __init__(self, connect_timeout_s: float = CONNECT_TIMEOUT_S):
        self._client: GreengrassCoreIPCClientV2 | None = None
        self._lost: GreengrassCoreIPCClientV2 | None = None  # set from the SDK's thread, closed from ours
        self._connect_timeout_s = connect_timeout_s
        self._failing = False  # the nucleus's last answer to a publish was a transient error (ServiceError)
        self.connected = False
        self.reconnects = 0

    def connect(self, timeout_s: float) -> None:
        self._connect_timeout_s = timeout_s
        try:
            self._reconnect()
        except ConnectionError as error:
            log.warning("%s; results wait in the outbox", error)

    def _reconnect(self) -> GreengrassCoreIPCClientV2:
        if self._lost is not None and self._lost is self._client:
            self._drop()
        if self._client is None:
            self._client = open_ipc(self._connect_timeout_s)
            self.connected = True
        return self._client

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> Future:
        """Called on the outbox's sender thread, which is also where a lost connection is replaced."""
        acknowledged: Future = Future()
        try:
            client = self._reconnect()
            reply = client.publish_to_iot_core_async(
                topic_name=topic, qos=QOS.AT_LEAST_ONCE if qos else QOS.AT_MOST_ONCE, payload=payload, retain=retain or None
            )
        except (ConnectionError, TransportError, *NOT_STARTED) as error:
            self._drop()
            acknowledged.set_exception(error)
            return acknowledged
        reply.add_done_callback(lambda done: self._settle(acknowledged, done, topic, client))
        return acknowledged

    def _settle(self, acknowledged: Future, reply: Future, topic: str, client: GreengrassCoreIPCClientV2) -> None:
        """On the SDK's thread: only records (and logs); the next publish replaces a lost connection."""
        error = reply.exception()
        if error is None:
            if self._failing:
                self._failing = False
                log.info("the nucleus takes messages again")
            acknowledged.set_result(None)
            return
        if isinstance(error, (UnauthorizedError, InvalidArgumentsError)):
            error = PublishRejected(
                f"the nucleus refused PublishToIoTCore on {topic} ({type(error).__name__}: {error.message}); "
                "allow the topic in the recipe's accessControl for aws.greengrass.ipc.mqttproxy or fix topics.*"
            )
        elif isinstance(error, GreengrassCoreIPCError):
            if not self._failing:
                self._failing = True
                log.warning("the nucleus did not take a message on %s (%s: %s); the outbox keeps it and sends it again", topic, type(error).__name__, error.message)
        elif isinstance(error, CONNECTION_LOST):
            self._lost = client
        acknowledged.set_exception(error)

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self.connected = False
            self.reconnects += 1
            client.close(executor_wait=False)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        self.connected = False


def from_settings(settings: Settings, topics: Topics) -> SpooledTransport:
    """Registry factory (see agent.app.TRANSPORTS): the durable outbox drained through PublishToIoTCore."""
    return SpooledTransport(IpcLink(), topics, open_outbox(settings.outbox), settings.outbox, connect_timeout_s=CONNECT_TIMEOUT_S)
