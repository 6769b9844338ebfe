"""MQTT5 over mutual TLS to AWS IoT Core, on awsiotsdk's own builder: the `Link` the outbox drives.

The SDK does the connection work (TLS, reconnect with exponential backoff and jitter, IoT Core's flow
control); this module adds only what the agent needs on top: a retained online status on every connect
and an offline last will, PUBACK reason codes turned into "done", "refused for good" or "try again",
re-subscription after a reconnect, a log line for every connection change (a takeover of our client id
named as such), and start-up errors as one line naming the setting to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from awscrt import exceptions, mqtt5
from awsiot import mqtt5_client_builder

from agent.errors import TransportError
from agent.messages import StatusMessage
from agent.settings import MqttSettings, Settings
from agent.topics import Topics
from agent.transport.base import PublishRejected
from agent.transport.outbox import open_outbox
from agent.transport.spooled import SpooledTransport, describe
from agent.transport.tls import check_credentials, server_certificate_problem

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]

STOP_TIMEOUT_S = 0.5  # how long close() waits for the SDK's "stopped" event (milliseconds, normally)
CHECK_SERVER_AFTER_S = 1.0  # a first attempt still going after this long has its endpoint's certificate checked
ACCEPTED = {mqtt5.PubackReasonCode.SUCCESS, mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS}
WORTH_RETRYING = {mqtt5.PubackReasonCode.QUOTA_EXCEEDED, mqtt5.PubackReasonCode.PACKET_IDENTIFIER_IN_USE}
# Connection failures retrying cannot fix; anything else (refused, reset, timed out) the SDK retries.
REFUSED_CERT = "the endpoint refused our certificate during the TLS handshake; mqtt.cert must be an active device certificate registered with (signed by a CA trusted by) this endpoint"
HANDSHAKE_FAILED = (
    "the TLS handshake failed: the endpoint's certificate is not signed by mqtt.ca, or the endpoint refused mqtt.cert; "
    "check --ca (Amazon Root CA 1 for IoT Core) and that the device certificate is active"
)
# A TLS failure on the very first attempt means certificates, not weather: tell the user instead of retrying.
FATAL_CONNECT = {
    "AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE": HANDSHAKE_FAILED,
    "AWS_IO_TLS_ERROR_READ_FAILURE": REFUSED_CERT,
    "AWS_IO_TLS_ALERT_NOT_GRACEFUL": REFUSED_CERT,
    # no such host (a DNS server said so); a resolver that cannot be reached yet is weather, and retried
    "AWS_IO_DNS_INVALID_NAME": "mqtt.endpoint names no host; use the endpoint from `aws iot describe-endpoint --endpoint-type iot:Data-ATS`",
}
FATAL_CONNACK = {
    mqtt5.ConnectReasonCode.NOT_AUTHORIZED,
    mqtt5.ConnectReasonCode.BAD_USERNAME_OR_PASSWORD,
    mqtt5.ConnectReasonCode.BANNED,
    mqtt5.ConnectReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
}


@dataclass(frozen=True)
class Presence:
    """The retained status announced on every (re)connect, and the will the broker publishes if we vanish."""

    topic: str
    online: bytes
    will: bytes | None = None


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching (+ one level, # the rest)."""
    levels, parts = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(levels) == len(parts)


def existing_file(path: Path | None, setting: str, what: str) -> str:
    if path is None:
        raise TransportError(f"mqtt.{setting} is not set; pass --{setting} FILE ({what})")
    if not Path(path).is_file():
        raise TransportError(f"mqtt.{setting} {path}: no such file; pass --{setting} with the {what}")
    return str(path)


class MqttLink:
    """One MQTT5 client to IoT Core. `client` is the SDK's client, for the Jobs and Shadow service clients."""

    def __init__(self, settings: MqttSettings, client_id: str):
        if not settings.endpoint:
            raise TransportError("mqtt.endpoint is not set; pass --endpoint (aws iot describe-endpoint --endpoint-type iot:Data-ATS)")
        self.settings = settings
        self.client_id = client_id
        self.address = f"{settings.endpoint}:{settings.port}"
        self.cert = existing_file(settings.cert, "cert", "device certificate, PEM")
        self.key = existing_file(settings.key, "key", "device private key, PEM")
        self.ca = existing_file(settings.ca, "ca", "CA certificate of the endpoint, PEM")
        check_credentials(Path(self.cert), Path(self.key), Path(self.ca))
        self.presence: Presence | None = None
        self.connected = False
        self.connections = 0
        self._client: mqtt5.Client | None = None
        self._handlers: dict[str, MessageHandler] = {}
        self._first_attempt = threading.Event()
        self._stopped = threading.Event()
        self._state = threading.Lock()  # between connect() deciding and the SDK's threads reporting
        self._running = False  # connect() has returned: a fault is a warning from now on, not its exception
        self._closing = False
        self._fatal: str | None = None

    @property
    def client(self) -> mqtt5.Client:
        if self._client is None:
            raise RuntimeError("MqttLink.connect() has not been called")
        return self._client

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)

    def connect(self, timeout_s: float) -> None:
        """Start the client, wait up to `timeout_s` for the first attempt; a fatal refusal raises, the rest retries."""
        settings = self.settings
        will = None
        if self.presence and self.presence.will:
            will = mqtt5.PublishPacket(topic=self.presence.topic, payload=self.presence.will, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True)
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                cert_filepath=self.cert,
                pri_key_filepath=self.key,
                ca_filepath=self.ca,
                endpoint=settings.endpoint,
                port=settings.port,
                client_id=self.client_id,
                keep_alive_interval_sec=settings.keep_alive_s,
                will=will,
                extended_validation_and_flow_control_options=(
                    mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
                    if settings.flow_control == "iot-core"
                    else mqtt5.ExtendedValidationAndFlowControlOptions.NONE
                ),
                retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
                min_reconnect_delay_ms=int(settings.min_reconnect_delay_s * 1000),
                max_reconnect_delay_ms=int(settings.max_reconnect_delay_s * 1000),
                connack_timeout_ms=int(settings.connect_timeout_s * 1000),
                ack_timeout_sec=settings.ack_timeout_s,
                on_publish_received=self._on_message,
                on_lifecycle_connection_success=self._on_connected,
                on_lifecycle_connection_failure=self._on_connect_failed,
                on_lifecycle_disconnection=self._on_disconnected,
                on_lifecycle_stopped=lambda data: self._stopped.set(),
            )
        except (exceptions.AwsCrtError, RuntimeError) as error:  # awscrt raises a plain RuntimeError for bad TLS files
            raise TransportError(f"mqtt.cert/mqtt.key/mqtt.ca: awscrt cannot use them ({error}); pass PEM files: the device certificate, its private key, the endpoint's CA") from None
        self._client.start()
        deadline = time.monotonic() + timeout_s
        if not self._first_attempt.wait(min(CHECK_SERVER_AFTER_S, timeout_s)):
            threading.Thread(target=self._check_server, args=(deadline,), name="mqtt-server-check", daemon=True).start()
            self._first_attempt.wait(max(0.0, deadline - time.monotonic()))
        with self._state:
            self._running = True
            fatal = self._fatal
        if fatal:
            self.close()
            raise TransportError(f"cannot connect to {self.address}: {fatal}")

    def interrupt(self) -> None:
        """Stop waiting for the first attempt (a stop signal arrived); the client carries on until close()."""
        self._first_attempt.set()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> Future:
        outcome: Future = Future()
        sent = self.client.publish(mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS(qos), retain=retain))
        sent.add_done_callback(lambda f: settle_publish(f, outcome))
        return outcome

    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> Future:
        """Call `handler(topic, payload)` for every message on `topic_filter`, again after every reconnect."""
        self._handlers[topic_filter] = handler
        return self._subscribe(topic_filter, qos)

    def close(self) -> None:
        """Disconnect cleanly. The client object is kept until the SDK says it stopped: awscrt 0.36 can still
        deliver a message after stop() returns, and its event-loop thread crashes if the object is gone."""
        self._closing = True
        if self._client is not None:
            self._client.stop(mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION))
            if self._stopped.wait(STOP_TIMEOUT_S):
                self._client = None

    def _subscribe(self, topic_filter: str, qos: int = 1) -> Future:
        return self.client.subscribe(mqtt5.SubscribePacket(subscriptions=[mqtt5.Subscription(topic_filter=topic_filter, qos=mqtt5.QoS(qos))]))

    def _check_server(self, deadline: float) -> None:
        """On its own thread while the first attempt goes on: a certificate the CA does not verify is fatal now,
        not when s2n's blinding delay lets the SDK say so (and then only as a handshake failure)."""
        problem = server_certificate_problem(self.settings.endpoint, self.settings.port, Path(self.ca), max(1.0, deadline - time.monotonic()))
        if problem:
            self._fault(problem)

    def _fault(self, problem: str) -> None:
        """Something retrying cannot fix: connect()'s exception while it waits, a warning once it has returned."""
        with self._state:
            if not self._running:
                self._fatal = self._fatal or problem
                self._first_attempt.set()
                return
        log.warning("cannot connect to %s: %s; retrying with backoff", self.address, problem)

    def _on_message(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        for topic_filter, handler in list(self._handlers.items()):
            if topic_matches(topic_filter, packet.topic):
                handler(packet.topic, bytes(packet.payload))

    def _on_connected(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.connected = True
        self.connections += 1
        self._first_attempt.set()
        where = {"endpoint": self.settings.endpoint, "port": self.settings.port, "client_id": self.client_id}
        if self.connections == 1:
            log.info("connected to %s as client id %s", self.address, self.client_id, extra=where)
            return
        log.info("reconnected to %s as client id %s", self.address, self.client_id, extra=where)
        if self.presence:  # the will may have replaced our retained status while we were away
            self.client.publish(mqtt5.PublishPacket(topic=self.presence.topic, payload=self.presence.online, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=True))
        if not data.connack_packet.session_present:
            for topic_filter in self._handlers:
                self._subscribe(topic_filter)

    def _on_connect_failed(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        if self._closing:  # stop() ends an attempt in progress this way
            return
        reason = data.connack_packet.reason_code if data.connack_packet else None
        name = describe(data.exception)
        if reason in FATAL_CONNACK:
            self._fault(f"the broker refused the connection ({reason.name}); check that mqtt.cert is active and its IoT policy lets it connect as client id {self.client_id!r} (thing_name)")
        elif name in FATAL_CONNECT and not self.connections:
            self._fault(f"{FATAL_CONNECT[name]} ({name})")
        else:
            log.warning("connection to %s failed (%s); retrying with backoff", self.address, name)
        self._first_attempt.set()

    def _on_disconnected(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self.connected = False
        if self._closing:
            return
        packet = data.disconnect_packet
        if packet is not None and packet.reason_code == mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER:
            log.warning(
                "the broker disconnected us because another client connected with our client id %r (SESSION_TAKEN_OVER): "
                "two agents with thing_name %s? give each device its own thing name and certificate; reconnecting",
                self.client_id, self.client_id, extra={"client_id": self.client_id, "reason": "SESSION_TAKEN_OVER"},
            )
            return
        why = f"the broker said {packet.reason_code.name}" if packet is not None else describe(data.exception)
        log.warning("disconnected from %s (%s); reconnecting with backoff", self.address, why)


def settle_publish(sent: Future, outcome: Future) -> None:
    """The SDK's publish result as ours: acknowledged, PublishRejected (never retry), or a transient error."""
    error = sent.exception()
    if error is not None:
        name = getattr(error, "name", "")
        if "VALIDATION" in name:  # the SDK refused the packet itself (topic, size): resending cannot help
            error = PublishRejected(f"refused before sending ({name})")
        outcome.set_exception(error)
        return
    puback = sent.result().puback
    code = puback.reason_code if puback else mqtt5.PubackReasonCode.SUCCESS
    if code in ACCEPTED:
        outcome.set_result(code)
    elif code in WORTH_RETRYING:
        outcome.set_exception(TransportError(f"broker answered {code.name}"))
    else:
        outcome.set_exception(PublishRejected(f"broker refused it ({getattr(code, 'name', code)}{': ' + puback.reason_string if puback.reason_string else ''})"))


class MqttTransport(SpooledTransport):
    """The outbox transport on an MqttLink, with the online status retained and an offline last will."""

    link: MqttLink
    has_last_will = True

    def start(self, online: StatusMessage, will: StatusMessage | None = None) -> None:
        """The will is registered with the broker at connect time; it is a message of its own (README)."""
        self.link.presence = Presence(self.topics.status, online.to_json_bytes(), will.to_json_bytes() if will else None)
        super().start(online, will)

    def interrupt(self) -> None:
        self.link.interrupt()

    def announce(self, status: StatusMessage) -> None:
        """Also remember it: after a reconnect the link re-announces the latest status, not the first one."""
        if self.link.presence is not None:
            self.link.presence = replace(self.link.presence, online=status.to_json_bytes())
        super().announce(status)


def from_settings(settings: Settings, topics: Topics) -> MqttTransport:
    """Registry factory (see agent.app.TRANSPORTS)."""
    link = MqttLink(settings.mqtt, client_id=settings.thing_name)
    return MqttTransport(link, topics, open_outbox(settings.outbox), settings.outbox, connect_timeout_s=settings.mqtt.connect_timeout_s)
