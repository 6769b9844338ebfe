"""A local stand-in for IoT Core: Mosquitto with mutual TLS and an ACL mirroring deploy/iot/policy.json.

Reusable by any test that needs a broker (model updates, Jobs, Shadow):

    from broker import Pki, Mosquitto, Observer   # tests/ is on sys.path (rootdir conftest)

    pki = Pki.create(tmp_dir)                       # test CA, server cert, a rogue CA
    device = pki.client("my-thing")                 # cert + key whose CN is the thing name
    with Mosquitto(tmp_dir, pki) as broker:         # free port, require_certificate, ACL keyed on the CN
        with Observer(broker, pki) as observer:     # sees every topic (including $aws/...), may publish anywhere
            observer.subscribe("edge/#")
            ...
            broker.restart()                         # or .stop() / .start() / .kill()

The pytest fixtures at the bottom (`pki`, `mosquitto`, `observer`) give one broker per test module;
import them into a test module with `from broker import pki, mosquitto, observer  # noqa: F401`.
Certificates come from the `cryptography` package (no openssl subprocess, a few ms each).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest
from awscrt import mqtt5
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
POLICY_ACL = REPO / "deploy" / "iot" / "mosquitto-acl"
OBSERVER = "test-observer"  # the identity the tests subscribe with: may read and write every topic
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# awscrt 0.36.1 can deliver a PUBLISH after stop() returns; were the client object gone, its event-loop thread
# would crash. Stopped clients are kept alive here for the rest of the session.
STOPPED_CLIENTS: list = []

needs_mosquitto = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto not installed (make test installs it)")


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


@dataclass
class Authority:
    """A certificate authority that can sign server and client certificates."""

    name: str
    folder: Path
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    cert: x509.Certificate | None = None

    def __post_init__(self):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (
            self._builder(subject, self.key.public_key(), subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = self.folder / f"{self.name}.ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public_key, issuer: x509.Name) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    def certify(self, common_name: str, public_key, server: bool = False) -> bytes:
        """A certificate (PEM) for `public_key` whose CN is `common_name`, signed by this CA."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, public_key, self.cert.subject).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, server: bool = False) -> Credentials:
        """A key and certificate for `common_name`, written as PEM files next to the CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        stem = f"{self.name}.{common_name}"
        credentials = Credentials(cert=self.folder / f"{stem}.crt.pem", key=self.folder / f"{stem}.key.pem")
        credentials.cert.write_bytes(self.certify(common_name, key.public_key(), server))
        credentials.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        credentials.key.chmod(0o600)
        return credentials


@dataclass
class Pki:
    """The test CA (trusted by the broker), its server certificate, and a rogue CA the broker does not trust."""

    ca: Authority
    server: Credentials
    rogue: Authority

    @classmethod
    def create(cls, folder: Path) -> "Pki":
        folder.mkdir(parents=True, exist_ok=True)
        ca = Authority("test-ca", folder)
        return cls(ca=ca, server=ca.issue("localhost", server=True), rogue=Authority("rogue-ca", folder))

    def client(self, thing_name: str) -> Credentials:
        """A device certificate whose CN is the thing name, signed by the CA the broker trusts."""
        return self.ca.issue(thing_name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Mosquitto:
    """One mosquitto process on a free port of 127.0.0.1: mutual TLS, identity = certificate CN, policy ACL."""

    def __init__(self, folder: Path, pki: Pki, port: int | None = None, extra_acl: str = ""):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = folder / "mosquitto.log"
        self.acl = folder / "acl"
        self.acl.write_text(f"{POLICY_ACL.read_text()}\n{extra_acl}\nuser {OBSERVER}\ntopic readwrite #\ntopic readwrite $aws/#\n")
        self.config = folder / "mosquitto.conf"
        run_as = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(
            f"{run_as}persistence true\npersistence_location {folder}/\nallow_anonymous false\nper_listener_settings false\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"acl_file {self.acl}\n"
            f"listener {self.port} 127.0.0.1\nprotocol mqtt\n"
            f"cafile {pki.ca.path}\ncertfile {pki.server.cert}\nkeyfile {pki.server.key}\n"
            "require_certificate true\nuse_identity_as_username true\n"
        )

    def start(self, timeout_s: float = 10.0) -> "Mosquitto":
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode()} {self.log.read_text() if self.log.exists() else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout_s} s")

    def grant(self, username: str, rules: str) -> None:
        """Add an identity's ACL rules and have mosquitto reload them (SIGHUP), as IoT Core attaches a policy."""
        with self.acl.open("a") as acl:
            acl.write(f"\nuser {username}\n{rules}\n")
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Cable:
    """A TCP forwarder between the device and the broker that a test can cut and restore: a flaky link.

    Cut, the device's connections are reset and new ones refused, exactly as if the broker went away, while
    the observer (connected to the broker directly) misses nothing.
    """

    def __init__(self, broker: Mosquitto):
        self.broker = broker
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def restore(self) -> "Cable":
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen()
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            doomed, self._sockets = self._sockets, []
        if server:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(), releasing the port
            except OSError:
                pass
            server.close()
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pipe threads blocked in recv(); both ends see the link drop
            except OSError:
                pass
            sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                device, _ = server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.broker.port))
            except OSError:
                return
            with self._lock:
                if self._server is not server:
                    device.close()
                    upstream.close()
                    return
                self._sockets += [device, upstream]
            for source, sink in ((device, upstream), (upstream, device)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Observer:
    """An awscrt MQTT5 client with the all-topics identity: records what it receives, re-subscribes after reconnects."""

    def __init__(self, broker: Mosquitto, pki: Pki, client_id: str = OBSERVER):
        credentials = pki.ca.issue(OBSERVER)
        self.messages: list[Received] = []
        self._filters: list[str] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._ready = threading.Event()
        from awsiot import mqtt5_client_builder

        self.client = mqtt5_client_builder.mtls_from_path(
            cert_filepath=str(credentials.cert),
            pri_key_filepath=str(credentials.key),
            ca_filepath=str(pki.ca.path),
            endpoint="127.0.0.1",
            port=broker.port,
            client_id=client_id,
            extended_validation_and_flow_control_options=mqtt5.ExtendedValidationAndFlowControlOptions.NONE,
            min_reconnect_delay_ms=20,
            max_reconnect_delay_ms=200,
            on_publish_received=self._on_message,
            on_lifecycle_connection_success=self._on_connected,
            on_lifecycle_disconnection=self._on_disconnected,
        )

    def __enter__(self) -> "Observer":
        self.client.start()
        assert self._connected.wait(10), "observer could not connect to the test broker"
        return self

    def __exit__(self, *exc) -> None:
        self.client.stop()
        STOPPED_CLIENTS.append(self.client)

    def subscribe(self, topic_filter: str) -> None:
        self._filters.append(topic_filter)
        self._subscribe(topic_filter).result(10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Future:
        return self.client.publish(mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE, retain=retain))

    def clear(self) -> None:
        with self._changed:
            self.messages.clear()

    def on(self, topic: str) -> list[Received]:
        with self._changed:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float = 20.0) -> list[Received]:
        """Block until `predicate(messages)` holds; the messages so far either way (the test asserts)."""
        with self._changed:
            self._changed.wait_for(lambda: predicate(self.messages), timeout_s)
            return list(self.messages)

    def _subscribe(self, topic_filter: str) -> Future:
        return self.client.subscribe(mqtt5.SubscribePacket(subscriptions=[mqtt5.Subscription(topic_filter=topic_filter, qos=mqtt5.QoS.AT_LEAST_ONCE)]))

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Until connected and subscribed again (after a broker restart, before letting the device back in)."""
        assert self._ready.wait(timeout_s), "observer did not reconnect and resubscribe"

    def _on_connected(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        # Mosquitto 2.0.11 does not restore sessions of certificate-named clients after a restart: resubscribe.
        pending = [self._subscribe(topic_filter) for topic_filter in self._filters]
        if pending:
            pending[-1].add_done_callback(lambda f: self._ready.set())
        else:
            self._ready.set()
        self._connected.set()

    def _on_disconnected(self, data) -> None:
        self._connected.clear()
        self._ready.clear()

    def _on_message(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        with self._changed:
            self.messages.append(Received(packet.topic, bytes(packet.payload), int(packet.qos), bool(packet.retain)))
            self._changed.notify_all()


# -- pytest fixtures: one PKI per session, one broker per module --------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mosquitto(pki, tmp_path_factory) -> Iterator[Mosquitto]:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto not installed (make test installs it)")
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), pki) as broker:
        yield broker


@pytest.fixture
def observer(mosquitto, pki) -> Iterator[Observer]:
    """A fresh all-topics subscriber per test (the broker must be running when the test starts)."""
    if mosquitto.process is None:
        mosquitto.start()
    with Observer(mosquitto, pki) as subscriber:
        yield subscriber
