"""Fleet provisioning by claim: a device that ships with a claim certificate makes itself a thing on first boot.

`edge-agent provision` connects with the claim certificate, asks IoT Core for a new key pair and certificate
(CreateKeysAndCertificate), and registers itself through the fleet provisioning template (RegisterThing),
which creates the thing, activates the certificate and attaches the device policy. It then writes its own
certificate, private key (0600) and settings (agent.yaml) so that `edge-agent run --config DIR/agent.yaml`
runs. Both requests go through the SDK's `IotIdentityClientV2` on an MQTT5 client from its mqtt5_client_builder.

Restart-safe: the new credentials and their ownership token are kept in DIR/pending.json (0600, written
atomically) before RegisterThing is asked, so a run that stops half way (power cut, broker gone, rejected)
resumes with the same certificate instead of leaving another unused one behind; agent.yaml is written last,
atomically, and its presence means "provisioned" (a further run changes nothing). Every file is written to
a temporary name, flushed and renamed, so none is ever seen half written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError, ProvisioningError
from agent.settings import AMAZON_ROOT_CA, CERT_FILE, KEY_FILE, SETTINGS_FILE, device_settings, validate_settings

log = logging.getLogger(__name__)

CA_FILE = "root-ca.pem"
PENDING_FILE = "pending.json"
SERIAL_PARAMETER = "SerialNumber"  # the template's parameter (deploy/cloudformation/edge-agent.yaml)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """`path` holds `data` with `mode`, or is as it was: a temporary file, flushed, then renamed over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)  # left by a run that stopped mid-write
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(temporary, mode)  # not widened or narrowed by the umask
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclass(frozen=True)
class Claim:
    """How to reach IoT Core as the claim: its certificate and key, the endpoint, the CA, the template."""

    cert: Path
    key: Path
    endpoint: str
    template: str
    port: int = 8883
    ca: Path = AMAZON_ROOT_CA
    timeout_s: float = 30.0


def default_serial() -> str:
    """The serial number a device registers with when none is given: its host name."""
    return socket.gethostname().split(".")[0]


class Provisioner:
    """One device's provisioning into `out`; `run()` does what is still to do and returns the summary."""

    def __init__(self, claim: Claim, out: Path, serial: str, trusted_keys: list[Path] = ()):
        self.claim = claim
        self.out = Path(out)
        self.serial = serial
        self.trusted_keys = [Path(key).resolve() for key in trusted_keys]
        for flag, path in (("--claim-cert", claim.cert), ("--claim-key", claim.key), ("--ca", claim.ca), *(("--trusted-key", key) for key in self.trusted_keys)):
            if not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        # The serial becomes the thing name: check it as one before asking AWS for anything.
        validate_settings(self._settings(serial), "provision --serial")

    def _settings(self, thing: str) -> dict[str, Any]:
        home = self.out.resolve()
        return device_settings(thing, self.claim.endpoint, cert=home / CERT_FILE, key=home / KEY_FILE, ca=home / CA_FILE, port=self.claim.port, trusted_keys=self.trusted_keys)

    def run(self) -> dict[str, Any]:
        settings_file = self.out / SETTINGS_FILE
        if settings_file.exists():
            thing = yaml.safe_load(settings_file.read_text())["thing_name"]
            log.info("already provisioned as %s (%s); nothing to do", thing, settings_file)
            return {"thing": thing, "settings": str(settings_file), "already_provisioned": True}
        self.out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.out, 0o700)
        with IdentityService(self.claim) as service:
            pending = self._pending()
            if pending is None:
                pending = service.create_keys_and_certificate()
                write_atomically(self.out / PENDING_FILE, json.dumps(pending).encode(), 0o600)
                log.info("new certificate %s; registering through template %s", pending["certificateId"], self.claim.template)
            else:
                log.info("resuming: registering certificate %s from an earlier run", pending["certificateId"])
            registered = service.register_thing(pending["certificateOwnershipToken"], {SERIAL_PARAMETER: self.serial})
        thing = registered["thingName"]
        write_atomically(self.out / KEY_FILE, pending["privateKey"].encode(), 0o600)
        write_atomically(self.out / CERT_FILE, pending["certificatePem"].encode(), 0o644)
        write_atomically(self.out / CA_FILE, Path(self.claim.ca).read_bytes(), 0o644)
        write_atomically(settings_file, yaml.safe_dump(self._settings(thing), sort_keys=False).encode(), 0o600)
        (self.out / PENDING_FILE).unlink()
        log.info("provisioned as thing %s; run: edge-agent run --config %s", thing, settings_file)
        return {
            "thing": thing,
            "certificate_id": pending["certificateId"],
            "settings": str(settings_file),
            "device_configuration": registered.get("deviceConfiguration") or {},
            "already_provisioned": False,
        }

    def _pending(self) -> dict[str, str] | None:
        try:
            return json.loads((self.out / PENDING_FILE).read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # cannot be half written (atomic), but may have been edited: start over
            log.warning("%s is not valid JSON; asking for a new certificate", self.out / PENDING_FILE)
            return None


class IdentityService:
    """IoT Core's fleet provisioning MQTT API over the claim's own MQTT5 connection (the SDK's IotIdentityClientV2).

    One connection attempt: a device that cannot reach IoT Core says so and exits (its service manager runs
    it again), rather than retrying inside a command that is meant to finish.
    """

    def __init__(self, claim: Claim):
        self.claim = claim
        self._client = None
        self._identity = None
        self._attempted = threading.Event()
        self._stopped = threading.Event()
        self._failure: str | None = None

    def __enter__(self) -> "IdentityService":
        from awscrt import exceptions, mqtt_request_response
        from awsiot import mqtt5_client_builder
        from awsiot.iotidentity import IotIdentityClientV2

        claim = self.claim
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                cert_filepath=str(claim.cert),
                pri_key_filepath=str(claim.key),
                ca_filepath=str(claim.ca),
                endpoint=claim.endpoint,
                port=claim.port,
                client_id=f"provision-{uuid.uuid4().hex}",
                connack_timeout_ms=int(claim.timeout_s * 1000),
                on_lifecycle_connection_success=lambda data: self._attempted.set(),
                on_lifecycle_connection_failure=self._on_failure,
                on_lifecycle_stopped=lambda data: self._stopped.set(),
            )
        except exceptions.AwsCrtError as error:
            raise ConfigError(f"--claim-cert/--claim-key/--ca: cannot load them ({error.name}); pass the claim certificate, its private key and the endpoint's CA as PEM files") from None
        self._client.start()
        if not self._attempted.wait(claim.timeout_s) or self._failure:
            self.__exit__()
            reason = self._failure or f"no answer in {claim.timeout_s:.0f} s"
            raise ProvisioningError(f"cannot reach {claim.endpoint}:{claim.port} to provision ({reason}); check --endpoint, the claim certificate and the network, then run `edge-agent provision` again (it resumes where it stopped)")
        options = mqtt_request_response.ClientOptions(max_request_response_subscriptions=2, max_streaming_subscriptions=1, operation_timeout_in_seconds=int(claim.timeout_s))
        self._identity = IotIdentityClientV2(self._client, options)
        return self

    def _on_failure(self, data) -> None:
        reason = data.connack_packet.reason_code.name if data.connack_packet else getattr(data.exception, "name", repr(data.exception))
        self._failure = self._failure or reason
        self._attempted.set()

    def __exit__(self, *exc) -> None:
        from awscrt import mqtt5

        self._identity = None  # released while the MQTT client it rides on still runs
        if self._client is not None:
            self._client.stop(mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode.NORMAL_DISCONNECTION))
            self._stopped.wait(5)
            self._client = None

    def create_keys_and_certificate(self) -> dict[str, str]:
        from awsiot.iotidentity import CreateKeysAndCertificateRequest

        reply = self._ask("CreateKeysAndCertificate", self._identity.create_keys_and_certificate(CreateKeysAndCertificateRequest()))
        return {
            "certificateId": reply.certificate_id,
            "certificatePem": reply.certificate_pem,
            "privateKey": reply.private_key,
            "certificateOwnershipToken": reply.certificate_ownership_token,
        }

    def register_thing(self, token: str, parameters: dict[str, str]) -> dict[str, Any]:
        from awsiot.iotidentity import RegisterThingRequest

        request = RegisterThingRequest(template_name=self.claim.template, certificate_ownership_token=token, parameters=parameters)
        reply = self._ask("RegisterThing", self._identity.register_thing(request))
        return {"thingName": reply.thing_name, "deviceConfiguration": reply.device_configuration}

    def _ask(self, operation: str, future):
        from awsiot import V2ServiceException

        try:
            return future.result(self.claim.timeout_s + 5)
        except V2ServiceException as error:
            modeled = getattr(error, "modeled_error", None)
            if modeled is None:  # no answer in time, or the request could not be sent
                raise ProvisioningError(f"{operation}: no answer from {self.claim.endpoint} within {self.claim.timeout_s:.0f} s; run `edge-agent provision` again (it resumes where it stopped)") from None
            advice = f"check --template {self.claim.template!r} (the stack's ProvisioningTemplateName) and that the claim's policy allows it" if operation == "RegisterThing" else "check the claim certificate's policy"
            raise ProvisioningError(f"{operation} rejected ({modeled.status_code} {modeled.error_code}: {modeled.error_message}); {advice}") from None
        except FutureTimeout:
            raise ProvisioningError(f"{operation}: no answer from {self.claim.endpoint} within {self.claim.timeout_s:.0f} s; run `edge-agent provision` again (it resumes where it stopped)") from None


def provision(claim: Claim, out: Path, serial: str | None = None, trusted_keys: list[Path] = ()) -> dict[str, Any]:
    """The `edge-agent provision` command."""
    return Provisioner(claim, out, serial or default_serial(), trusted_keys).run()

