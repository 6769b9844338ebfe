"""A stand-in Greengrass nucleus IPC server: AWS event-stream RPC over a Unix domain socket.

It speaks the wire protocol the real `awsiot.greengrasscoreipc` client speaks (framing, CRCs, CONNECT /
CONNECT_ACK, streams, modelled errors), so the agent under test runs its real IPC code path. It serves
the operations an inference component uses and records what it was asked, for tests to assert on:

    with IpcServer(tmp_path / "ipc.socket", configuration={...}) as nucleus:
        env = nucleus.component_env(thing_name="cam-1")      # what the nucleus gives a lifecycle script
        ...start the component...
        nucleus.wait_for(lambda: nucleus.published_to("edge/cam-1/inference"))
        nucleus.update_configuration({"model": {"score_threshold": 0.9}})   # pushes update events

It behaves like the real nucleus (aws-greengrass-nucleus) where a component can tell: numbers in the
configuration come back as floats (30 as 30.0), a deployment's configuration events arrive in a burst and
may repeat values that did not change, a deferral must answer the latest PreComponentUpdateEvent within the
deployment's timeout (later: ServiceError "Time limit to respond to PreComponentUpdateEvent exceeded"), and
PublishToIoTCore fails with ServiceError while the nucleus's spool is full. Tests can also send a protocol
error on a connection, or take the socket away (stop, then start again on the same path).

The codec is written here (awscrt exposes event-stream only inside its client, not as an encoder).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from agent.transport.mqtt import topic_matches

# --- event-stream framing ------------------------------------------------------------------------------

PRELUDE = struct.Struct(">II")  # total length, headers length; each prelude ends with its CRC32
BOOL_TRUE, BOOL_FALSE, BYTE, INT16, INT32, INT64, BYTES, STRING, TIMESTAMP, UUID = range(10)
FIXED = {BYTE: ">b", INT16: ">h", INT32: ">i", INT64: ">q", TIMESTAMP: ">q"}


class ProtocolViolation(Exception):
    """The peer sent bytes that are not a valid event-stream message."""


def _encode_header(name: str, kind: int, value: Any) -> bytes:
    raw_name = name.encode()
    out = bytes([len(raw_name)]) + raw_name + bytes([kind])
    if kind in (BOOL_TRUE, BOOL_FALSE):
        return out
    if kind in FIXED:
        return out + struct.pack(FIXED[kind], value)
    if kind == UUID:
        return out + value.bytes
    data = value.encode() if kind == STRING else bytes(value)
    return out + struct.pack(">H", len(data)) + data


def encode_message(headers: list[tuple[str, int, Any]], payload: bytes = b"") -> bytes:
    """One event-stream message: prelude + prelude CRC, headers, payload, message CRC."""
    raw_headers = b"".join(_encode_header(*header) for header in headers)
    total = PRELUDE.size + 4 + len(raw_headers) + len(payload) + 4
    prelude = PRELUDE.pack(total, len(raw_headers))
    body = prelude + struct.pack(">I", zlib.crc32(prelude)) + raw_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def decode_headers(raw: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos = 0
    while pos < len(raw):
        name_len = raw[pos]
        name = raw[pos + 1 : pos + 1 + name_len].decode()
        pos += 1 + name_len
        kind = raw[pos]
        pos += 1
        if kind in (BOOL_TRUE, BOOL_FALSE):
            value: Any = kind == BOOL_TRUE
        elif kind in FIXED:
            size = struct.calcsize(FIXED[kind])
            (value,) = struct.unpack(FIXED[kind], raw[pos : pos + size])
            pos += size
        elif kind == UUID:
            value = uuid.UUID(bytes=raw[pos : pos + 16])
            pos += 16
        elif kind in (BYTES, STRING):
            (size,) = struct.unpack(">H", raw[pos : pos + 2])
            data = raw[pos + 2 : pos + 2 + size]
            value = data.decode() if kind == STRING else data
            pos += 2 + size
        else:
            raise ProtocolViolation(f"unknown header type {kind} for {name!r}")
        headers[name] = value
    return headers


def _read_exact(conn: socket.socket, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def read_message(conn: socket.socket) -> tuple[dict[str, Any], bytes] | None:
    """The next message (headers, payload), None at end of stream; CRCs are checked."""
    prelude = _read_exact(conn, PRELUDE.size + 4)
    if prelude is None:
        return None
    total, headers_len = PRELUDE.unpack(prelude[:8])
    if struct.unpack(">I", prelude[8:])[0] != zlib.crc32(prelude[:8]):
        raise ProtocolViolation("prelude CRC mismatch")
    rest = _read_exact(conn, total - len(prelude))
    if rest is None:
        return None
    if struct.unpack(">I", rest[-4:])[0] != zlib.crc32(prelude + rest[:-4]):
        raise ProtocolViolation("message CRC mismatch")
    return decode_headers(rest[:headers_len]), rest[headers_len:-4]


# --- RPC layer -------------------------------------------------------------------------------------------

APPLICATION_MESSAGE, APPLICATION_ERROR, PING, PING_RESPONSE, CONNECT, CONNECT_ACK = range(6)
PROTOCOL_ERROR = 6
CONNECTION_ACCEPTED, TERMINATE_STREAM = 1, 2
NS = "aws.greengrass#"


class ModelledError(Exception):
    """An aws.greengrass# error shape sent back as an APPLICATION_ERROR."""

    def __init__(self, shape: str, message: str):
        super().__init__(message)
        self.shape = shape
        self.message = message


@dataclass(frozen=True)
class Published:
    topic: str
    qos: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Stream:
    connection: "_Connection"
    stream_id: int
    operation: str
    request: dict
    open: bool = True

    def send(self, shape: str, body: dict, *, terminate: bool = False, error: bool = False) -> None:
        self.connection.send(
            APPLICATION_ERROR if error else APPLICATION_MESSAGE,
            TERMINATE_STREAM if terminate else 0,
            self.stream_id,
            [(":content-type", STRING, "application/json"), ("service-model-type", STRING, NS + shape)],
            json.dumps(body).encode(),
        )
        if terminate:
            self.open = False


class _Connection:
    def __init__(self, server: "IpcServer", conn: socket.socket):
        self.server = server
        self.conn = conn
        self._write_lock = threading.Lock()
        self.streams: dict[int, Stream] = {}

    def send(self, message_type: int, flags: int, stream_id: int, headers: list, payload: bytes = b"") -> None:
        rpc = [(":message-type", INT32, message_type), (":message-flags", INT32, flags), (":stream-id", INT32, stream_id)]
        with self._write_lock:
            self.conn.sendall(encode_message(rpc + headers, payload))

    def protocol_error(self) -> None:
        """What a nucleus does with a client it cannot talk to any more: PROTOCOL_ERROR, then hang up."""
        try:
            self.send(PROTOCOL_ERROR, 0, 0, [])
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def serve(self) -> None:
        try:
            if not self._handshake():
                return
            while (message := read_message(self.conn)) is not None:
                self._dispatch(*message)
        except (OSError, ProtocolViolation):
            pass
        finally:
            self.server._forget(self)
            self.conn.close()

    def _handshake(self) -> bool:
        message = read_message(self.conn)
        if message is None:
            return False
        headers, payload = message
        if headers.get(":message-type") != CONNECT or headers.get(":version") != "0.1.0":
            self.send(PROTOCOL_ERROR, 0, 0, [])
            return False
        token = json.loads(payload or b"{}").get("authToken")
        accepted = token == self.server.auth_token
        self.server.connects.append(accepted)
        self.send(CONNECT_ACK, CONNECTION_ACCEPTED if accepted else 0, 0, [])
        if not accepted:  # let the client read the refusal and hang up first, as it does with the nucleus
            self.conn.settimeout(2.0)
            try:
                self.conn.recv(1)
            except OSError:
                pass
        return accepted

    def _dispatch(self, headers: dict, payload: bytes) -> None:
        kind = headers.get(":message-type")
        stream_id = headers.get(":stream-id", 0)
        if kind == PING:
            self.send(PING_RESPONSE, 0, 0, [])
            return
        if kind != APPLICATION_MESSAGE or stream_id == 0:
            return
        if headers.get(":message-flags", 0) & TERMINATE_STREAM and stream_id in self.streams:
            self.streams.pop(stream_id).open = False
            return
        operation = headers.get("operation", "").removeprefix(NS)
        stream = Stream(self, stream_id, operation, json.loads(payload or b"{}"))
        self.streams[stream_id] = stream
        self.server._record(self.server.operations, operation)
        handler = getattr(self.server, f"_op_{operation}", None)
        try:
            if handler is None:
                raise ModelledError("ServiceError", f"operation {operation} is not served by the test nucleus")
            handler(stream)
        except ModelledError as error:
            self.server._record(self.server.errors, Answered(operation, error.shape, error.message, stream.request))
            stream.send(error.shape, {"message": error.message}, terminate=True, error=True)
        if not stream.open:
            self.streams.pop(stream_id, None)


# --- the nucleus ----------------------------------------------------------------------------------------


def _nested(tree: dict, key_path: list[str]) -> Any:
    node: Any = tree
    for key in key_path:
        if not isinstance(node, dict) or key not in node:
            raise ModelledError("ResourceNotFoundError", f"Key not found: {'/'.join(key_path)}")
        node = node[key]
    return node


def _changed_leaves(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[list[str]]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [leaf for key in sorted(old.keys() | new.keys()) for leaf in _changed_leaves(old.get(key), new.get(key), path + (key,))]
    return [] if old == new else [list(path)]


def leaves(tree: dict, path: tuple[str, ...] = ()) -> list[list[str]]:
    """The key path of every value in a configuration tree."""
    return [leaf for key, value in tree.items() for leaf in (leaves(value, path + (key,)) if isinstance(value, dict) and value else [list(path + (key,))])]


def as_stored(value: Any) -> Any:
    """A configuration value as the nucleus hands it back: it keeps numbers as doubles, so 30 is 30.0."""
    if isinstance(value, dict):
        return {key: as_stored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_stored(item) for item in value]
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def merge_configuration(base: dict, update: dict) -> dict:
    """A deployment's MERGE: nested keys replaced one by one, like the nucleus does."""
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge_configuration(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


@dataclass
class Deferral:
    deployment_id: str
    recheck_after_ms: int
    message: str | None


@dataclass(frozen=True)
class Answered:
    """A request the test nucleus answered with a modelled error."""

    operation: str
    shape: str
    message: str
    request: dict


SPOOL_FULL = "com.aws.greengrass.mqttclient.spool.SpoolerStoreException: Message spool is full. Message could not be added."
LATE_DEFERRAL = "Time limit to respond to PreComponentUpdateEvent exceeded"


@dataclass
class IpcServer:
    """The test nucleus. Like the real one it authorises PublishToIoTCore and SubscribeToIoTCore against
    the component configuration's `accessControl` (aws.greengrass.ipc.mqttproxy, `{iot:thingName}`
    substituted, MQTT wildcards and `*` honoured) and answers UnauthorizedError otherwise."""

    socket_path: Path
    component_name: str = "com.example.EdgeAgent"
    thing_name: str = "test-thing"
    configuration: dict = field(default_factory=dict)
    auth_token: str = field(default_factory=lambda: uuid.uuid4().hex)
    published: list[Published] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    subscriptions: list[str] = field(default_factory=list)
    deferrals: list[Deferral] = field(default_factory=list)
    denied: list[tuple[str, str, bytes]] = field(default_factory=list)  # (operation, topic, payload)
    connects: list[bool] = field(default_factory=list)
    operations: list[str] = field(default_factory=list)  # every request, by operation name, in order
    errors: list[Answered] = field(default_factory=list)  # every request answered with a modelled error
    numbers_as_floats: bool = True  # GetConfiguration's numbers as the real nucleus sends them (30.0)
    spool_full: bool = False  # while set, PublishToIoTCore fails with ServiceError, as a full spooler makes it
    environment: dict[str, str] = field(default_factory=dict)  # more variables for components, e.g. the token exchange service's

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._connections: list[_Connection] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._awaiting_deferral: dict[str, float] = {}  # deployment id -> monotonic deadline of its answer

    # lifecycle

    def start(self) -> "IpcServer":
        self.socket_path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._accept_loop, name="test nucleus", daemon=True)
        self._thread.start()
        return self

    def stop(self, leave_socket: bool = False) -> None:
        """Hang up on every client and stop listening. `leave_socket`: keep the socket file, as a nucleus that
        died does, so that connecting is refused instead of finding no socket. start() serves again."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not, on Linux)
            except OSError:
                pass
            listener.close()
        for connection in list(self._connections):
            try:
                connection.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not leave_socket:
            self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> "IpcServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener = self._listener
        while self._listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connection = _Connection(self, conn)
            with self._changed:
                self._connections.append(connection)
            threading.Thread(target=connection.serve, name="test nucleus connection", daemon=True).start()

    def _forget(self, connection: _Connection) -> None:
        with self._changed:
            if connection in self._connections:
                self._connections.remove(connection)

    # what a component sees

    def component_env(self, auth_token: str | None = None) -> dict[str, str]:
        """The variables the nucleus sets for a lifecycle script, and no others (plus PATH and HOME)."""
        return {
            "AWS_IOT_THING_NAME": self.thing_name,
            "AWS_REGION": "eu-west-1",
            "SVCUID": auth_token or self.auth_token,
            "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": str(self.socket_path),
            "GGC_VERSION": "2.12.0",
            "GG_ROOT_CA_PATH": "/greengrass/v2/rootCA.pem",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            **self.environment,
        }

    # test controls

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Block until `predicate()` is truthy (re-checked on every recorded request); its value, or TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (value := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the test nucleus never saw what the test waited for")
                self._changed.wait(min(remaining, 0.5))
            return value

    def published_to(self, topic: str) -> list[Published]:
        return [message for message in self.published if message.topic == topic]

    def update_configuration(self, update: dict, repeat_unchanged: bool = False) -> None:
        """Merge `update` into the component configuration and notify every subscriber, leaf by leaf, in one
        burst. `repeat_unchanged`: an event for every leaf `update` names, changed or not, as the nucleus sends
        when a deployment merges values the component already has."""
        with self._changed:
            old, self.configuration = self.configuration, merge_configuration(self.configuration, update)
            changed = leaves(update) if repeat_unchanged else _changed_leaves(old, self.configuration)
        for stream in self._streams("SubscribeToConfigurationUpdate"):
            prefix = stream.request.get("keyPath") or []
            for key_path in changed:
                if key_path[: len(prefix)] == prefix:
                    event = {"componentName": self.component_name, "keyPath": key_path}
                    stream.send("ConfigurationUpdateEvents", {"configurationUpdateEvent": event})

    def push_iot_core_message(self, topic: str, payload: bytes) -> int:
        """Deliver a message from IoT Core to every matching SubscribeToIoTCore stream; how many got it."""
        streams = [s for s in self._streams("SubscribeToIoTCore") if topic_matches(s.request["topicName"], topic)]
        for stream in streams:
            message = {"topicName": topic, "payload": base64.b64encode(payload).decode()}
            stream.send("IoTCoreMessage", {"message": message})
        return len(streams)

    def announce_component_update(self, deployment_id: str, timeout_s: float = 60.0) -> int:
        """A deployment with componentUpdatePolicy NOTIFY_COMPONENTS: PreComponentUpdateEvent to subscribers,
        who may answer it (DeferComponentUpdate) once, within `timeout_s` (the policy's timeoutInSeconds).
        Like the nucleus, a new announcement forgets every earlier one still unanswered."""
        streams = self._streams("SubscribeToComponentUpdates")
        with self._changed:
            self._awaiting_deferral = {deployment_id: time.monotonic() + timeout_s} if streams else {}
        for stream in streams:
            event = {"deploymentId": deployment_id, "isGgcRestarting": False}
            stream.send("ComponentUpdatePolicyEvents", {"preUpdateEvent": event})
        return len(streams)

    def protocol_error(self, operation: str) -> int:
        """Send PROTOCOL_ERROR on, and hang up, every connection with an open `operation` stream; how many."""
        with self._changed:
            connections = [c for c in self._connections if any(s.operation == operation and s.open for s in c.streams.values())]
        for connection in connections:
            connection.protocol_error()
        return len(connections)

    def _streams(self, operation: str) -> list[Stream]:
        with self._changed:
            return [s for c in self._connections for s in c.streams.values() if s.operation == operation and s.open]

    def _record(self, bucket: list, item: Any) -> None:
        with self._changed:
            bucket.append(item)
            self._changed.notify_all()

    def _authorise(self, operation: str, topic: str, payload: bytes = b"") -> None:
        with self._changed:
            policies = self.configuration.get("accessControl", {}).get("aws.greengrass.ipc.mqttproxy", {})
        for policy in policies.values():
            if NS + operation in policy.get("operations", []) or "*" in policy.get("operations", []):
                for resource in policy.get("resources", []):
                    resource = resource.replace("{iot:thingName}", self.thing_name)
                    if resource == "*" or topic_matches(resource, topic):
                        return
        self._record(self.denied, (operation, topic, payload))
        raise ModelledError(
            "UnauthorizedError",
            f"Principal {self.component_name} is not authorized to perform aws.greengrass.ipc.mqttproxy:{NS}{operation} on resource {topic}",
        )

    # operations, named after their aws.greengrass# shapes

    def _op_PublishToIoTCore(self, stream: Stream) -> None:
        request = stream.request
        topic = request.get("topicName", "")
        payload = base64.b64decode(request.get("payload", ""))
        self._authorise("PublishToIoTCore", topic, payload)
        if request.get("qos") not in ("0", "1"):
            raise ModelledError("InvalidArgumentsError", f"qos must be '0' or '1', got {request.get('qos')!r}")
        if self.spool_full:
            raise ModelledError("ServiceError", f"Publish to topic {topic} failed with error {SPOOL_FULL}")
        self._record(self.published, Published(topic, request["qos"], payload, bool(request.get("retain"))))
        stream.send("PublishToIoTCoreResponse", {}, terminate=True)

    def _op_SubscribeToIoTCore(self, stream: Stream) -> None:
        self._authorise("SubscribeToIoTCore", stream.request.get("topicName", ""))
        self._record(self.subscriptions, stream.request.get("topicName", ""))
        stream.send("SubscribeToIoTCoreResponse", {})

    def _op_GetConfiguration(self, stream: Stream) -> None:
        key_path = stream.request.get("keyPath") or []
        component = stream.request.get("componentName") or self.component_name
        if component != self.component_name:
            raise ModelledError("ResourceNotFoundError", f"Component {component} not found")
        with self._changed:
            value = _nested(self.configuration, key_path)
        if not isinstance(value, dict):
            value = {key_path[-1]: value}
        if self.numbers_as_floats:
            value = as_stored(value)
        stream.send("GetConfigurationResponse", {"componentName": component, "value": value}, terminate=True)

    def _op_SubscribeToConfigurationUpdate(self, stream: Stream) -> None:
        self._record(self.subscriptions, "configuration:/" + "/".join(stream.request.get("keyPath") or []))
        stream.send("SubscribeToConfigurationUpdateResponse", {})

    def _op_UpdateState(self, stream: Stream) -> None:
        state = stream.request.get("state")
        if state not in ("RUNNING", "ERRORED"):
            raise ModelledError("InvalidArgumentsError", f"state must be RUNNING or ERRORED, got {state!r}")
        self._record(self.states, state)
        stream.send("UpdateStateResponse", {}, terminate=True)

    def _op_SubscribeToComponentUpdates(self, stream: Stream) -> None:
        self._record(self.subscriptions, "component-updates")
        stream.send("SubscribeToComponentUpdatesResponse", {})

    def _op_DeferComponentUpdate(self, stream: Stream) -> None:
        request = stream.request
        if not self._streams("SubscribeToComponentUpdates"):
            raise ModelledError("InvalidArgumentsError", "Component is not subscribed to component update events")
        deferral = Deferral(request.get("deploymentId", ""), int(request.get("recheckAfterMs") or 0), request.get("message"))
        with self._changed:
            deadline = self._awaiting_deferral.pop(deferral.deployment_id, None)
        if deadline is None or time.monotonic() > deadline:
            raise ModelledError("ServiceError", LATE_DEFERRAL)
        self._record(self.deferrals, deferral)
        stream.send("DeferComponentUpdateResponse", {}, terminate=True)

