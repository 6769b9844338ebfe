"""A stand-in for AWS IoT Core's fleet provisioning MQTT API, answering on Mosquitto as IoT Core does.

CreateKeysAndCertificate (`$aws/certificates/create/json`) answers on `/accepted` with a new RSA key pair and
a certificate signed by the test CA (so the broker trusts it), its id and an ownership token. RegisterThing
(`$aws/provisioning-templates/NAME/provision/json`) runs the template's body: the parameters it declares must
be given, the token must be one this service issued, the thing is named and grouped as the body says, the
certificate is activated and the device policy attached; here that means the broker is given the policy's
ACL for the certificate's identity (its CN, the certificate id) with the thing name filled in, and reloads
it. Rejections go to `/rejected` with IoT Core's error shape (statusCode, errorCode, errorMessage).

`hold_registrations` makes it take RegisterThing requests without answering them (a test then stops the
device half way); `answer_held()` answers the requests it holds.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import POLICY_ACL, STOPPED_CLIENTS, Mosquitto, Observer, Pki

CLAIM = "claim"  # CN of the claim certificate the tests' devices ship with


def claim_acl() -> str:
    """The stack's claim policy for Mosquitto. Registration is open to any template name (the policy names
    one), so that a device asking for a wrong template reaches this service and is rejected."""
    return (
        f"user {CLAIM}\n"
        "topic write $aws/certificates/create/json\n"
        "topic read $aws/certificates/create/json/+\n"
        "topic write $aws/provisioning-templates/+/provision/json\n"
        "topic read $aws/provisioning-templates/+/provision/json/+\n"
    )


def device_acl(thing: str) -> str:
    """The device policy (deploy/iot/mosquitto-acl) for one registered thing."""
    lines = [line for line in POLICY_ACL.read_text().splitlines() if line.startswith("pattern ")]
    return "\n".join("topic " + line.removeprefix("pattern ").replace("%u", thing) for line in lines)


@dataclass
class Certificate:
    certificate_id: str
    token: str
    status: str = "PENDING_ACTIVATION"
    thing: str | None = None


@dataclass
class Thing:
    name: str
    groups: list[str]
    attributes: dict[str, str]
    certificates: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)


class IdentityService(Observer):
    """CreateKeysAndCertificate and RegisterThing for devices holding the claim certificate."""

    def __init__(self, broker: Mosquitto, pki: Pki, templates: dict[str, dict[str, Any]]):
        super().__init__(broker, pki, client_id="identity-service")
        self.broker = broker
        self.pki = pki
        self.templates = templates
        self.certificates: dict[str, Certificate] = {}
        self.things: dict[str, Thing] = {}
        self.requests: Counter = Counter()  # operation -> requests received
        self.hold_registrations = False
        self.held = threading.Event()
        self._held: list[tuple[str, Any]] = []
        self._lock = threading.RLock()

    def __enter__(self) -> "IdentityService":
        super().__enter__()
        self.subscribe("$aws/certificates/create/json")
        self.subscribe("$aws/provisioning-templates/+/provision/json")
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        STOPPED_CLIENTS.append(self.client)

    def answer_held(self) -> None:
        with self._lock:
            self.hold_registrations = False
            held, self._held = self._held, []
            for topic, request in held:
                self._register(topic, request)

    def _on_message(self, data) -> None:
        super()._on_message(data)
        topic = data.publish_packet.topic
        try:
            request = json.loads(bytes(data.publish_packet.payload) or b"{}")
        except ValueError:
            request = None
        with self._lock:
            if topic == "$aws/certificates/create/json":
                self.requests["CreateKeysAndCertificate"] += 1
                self._create(topic)
            elif topic.startswith("$aws/provisioning-templates/") and topic.endswith("/provision/json"):
                self.requests["RegisterThing"] += 1
                if self.hold_registrations:
                    self._held.append((topic, request))
                    self.held.set()
                else:
                    self._register(topic, request)

    def _reply(self, topic: str, payload: dict[str, Any]) -> None:
        self.publish(topic, json.dumps(payload).encode())

    def _reject(self, topic: str, status: int, code: str, message: str) -> None:
        self._reply(topic + "/rejected", {"statusCode": status, "errorCode": code, "errorMessage": message})

    def _create(self, topic: str) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate_id = secrets.token_hex(32)  # IoT Core's ids are 64 hex digits; it is the identity's CN here
        pem = self.pki.ca.certify(certificate_id, key.public_key())
        token = secrets.token_urlsafe(96)
        self.certificates[certificate_id] = Certificate(certificate_id, token)
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
        self._reply(topic + "/accepted", {"certificateId": certificate_id, "certificatePem": pem.decode(), "privateKey": private.decode(), "certificateOwnershipToken": token})

    def _register(self, topic: str, request: Any) -> None:
        name = topic.split("/")[2]
        body = self.templates.get(name)
        if body is None:
            return self._reject(topic, 404, "ResourceNotFoundException", f"Template {name} not found")
        if not isinstance(request, dict):
            return self._reject(topic, 400, "InvalidPayload", "Request payload is not valid JSON")
        certificate = next((c for c in self.certificates.values() if c.token == request.get("certificateOwnershipToken")), None)
        if certificate is None:
            return self._reject(topic, 400, "InvalidCertificateOwnershipToken", "Certificate ownership token is invalid or has expired")
        given = request.get("parameters") or {}
        values = dict(given, **{"AWS::IoT::Certificate::Id": certificate.certificate_id})
        missing = [p for p, spec in body.get("Parameters", {}).items() if p not in values and "Default" not in spec]
        if missing:
            return self._reject(topic, 400, "InvalidParameters", f"Parameters {', '.join(missing)} are required by template {name}")
        resources = body["Resources"]
        thing_properties = next(r["Properties"] for r in resources.values() if r["Type"] == "AWS::IoT::Thing")
        thing_name = evaluate(thing_properties["ThingName"], values)
        if certificate.thing not in (None, thing_name):
            return self._reject(topic, 400, "InvalidCertificateOwnershipToken", "Certificate is already registered to another thing")
        thing = self.things.setdefault(thing_name, Thing(thing_name, [evaluate(g, values) for g in thing_properties.get("ThingGroups", [])], {k: evaluate(v, values) for k, v in thing_properties.get("AttributePayload", {}).items()}))
        policy = next(r["Properties"]["PolicyName"] for r in resources.values() if r["Type"] == "AWS::IoT::Policy")
        if certificate.certificate_id not in thing.certificates:
            thing.certificates.append(certificate.certificate_id)
            thing.policies.append(policy)
            self.broker.grant(certificate.certificate_id, device_acl(thing_name))
        certificate.status, certificate.thing = "ACTIVE", thing_name
        self._reply(topic + "/accepted", {"thingName": thing_name, "deviceConfiguration": body.get("DeviceConfiguration", {})})


def evaluate(node: Any, values: dict[str, str]) -> Any:
    """The provisioning template language's Ref and Fn::Join (what the stack's template uses)."""
    if isinstance(node, dict) and node.keys() == {"Ref"}:
        return values[node["Ref"]]
    if isinstance(node, dict) and node.keys() == {"Fn::Join"}:
        separator, parts = node["Fn::Join"]
        return separator.join(evaluate(part, values) for part in parts)
    return node
