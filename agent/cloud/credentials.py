"""Temporary AWS credentials for the device's own uploads: none are ever stored on the device.

Standalone, the AWS IoT credentials provider trades the device's certificate for them: an HTTPS GET of
`/role-aliases/{alias}/credentials` on the account's iot:CredentialProvider endpoint, over mutual TLS with
the same certificate and key the MQTT connection uses, naming the thing in `x-amzn-iot-thingname` (so the
role's policy can confine the device to its own S3 prefix with `${credentials-iot:ThingName}`). Under
Greengrass, the token exchange service (aws.greengrass.TokenExchangeService) does it for the nucleus's
certificate; botocore's own ContainerProvider reads its AWS_CONTAINER_CREDENTIALS_FULL_URI and
AWS_CONTAINER_AUTHORIZATION_TOKEN. Either way botocore holds them as refreshable credentials and fetches new
ones before they expire; the resolver holds only this one provider, so nothing on disk or in the
environment (keys, profiles) is ever used instead.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from pathlib import Path
from typing import Any

from botocore.config import Config
from botocore.credentials import (
    ContainerProvider,
    CredentialProvider,
    CredentialResolver,
    RefreshableCredentials,
)
from botocore.session import get_session

from agent.errors import ConfigError, TransportError
from agent.settings import CredentialSettings, MqttSettings

THING_HEADER = "x-amzn-iot-thingname"


class CredentialsRefused(TransportError):
    """The credentials provider did not give credentials (refused, unreachable, or an answer we cannot read)."""


class IotCredentialsProvider(CredentialProvider):
    """The AWS IoT credentials provider as a botocore credential provider."""

    METHOD = "iot-credentials-provider"

    def __init__(self, endpoint: str, role_alias: str, thing_name: str, cert: Path, key: Path, ca: Path, timeout_s: float = 10.0):
        host, _, port = endpoint.removeprefix("https://").rstrip("/").partition(":")
        self.host, self.port = host, int(port or 443)
        self.role_alias, self.thing_name, self.timeout_s = role_alias, thing_name, timeout_s
        self._context = ssl.create_default_context(cafile=str(ca))
        try:
            self._context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"capture credentials: cannot use the device certificate {cert} and key {key} ({exc}); check mqtt.cert and mqtt.key") from None

    def load(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(metadata=self.fetch(), refresh_using=self.fetch, method=self.METHOD)

    def fetch(self) -> dict[str, str]:
        """One request for credentials, in botocore's metadata form (access_key, secret_key, token, expiry_time)."""
        where = f"https://{self.host}:{self.port}/role-aliases/{self.role_alias}/credentials"
        connection = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self._context)  # SNI: the endpoint's name, as AWS requires
        try:
            connection.request("GET", f"/role-aliases/{self.role_alias}/credentials", headers={THING_HEADER: self.thing_name, "Accept": "application/json"})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise CredentialsRefused(f"credentials provider {where}: unreachable ({exc}); captures wait in the spool") from None
        finally:
            connection.close()
        if response.status != 200:
            raise CredentialsRefused(f"credentials provider {where}: HTTP {response.status} {_message(body)}; check the role alias, the thing attached to this certificate and its policy's iot:AssumeRoleWithCertificate")
        try:
            credentials = json.loads(body)["credentials"]
            return {
                "access_key": credentials["accessKeyId"],
                "secret_key": credentials["secretAccessKey"],
                "token": credentials["sessionToken"],
                "expiry_time": credentials["expiration"],
            }
        except (ValueError, KeyError, TypeError):
            raise CredentialsRefused(f"credentials provider {where}: answer is not credentials ({body[:80]!r})") from None


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:200]
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


def credential_provider(settings: CredentialSettings, mqtt: MqttSettings, thing_name: str, environ: dict[str, str] | None = None) -> CredentialProvider:
    """The provider the settings choose; a ConfigError naming what is missing."""
    environ = os.environ if environ is None else environ
    source = settings.source
    if source == "auto":
        source = "greengrass" if ContainerProvider.ENV_VAR_FULL in environ else "iot"
    if source == "greengrass":
        if ContainerProvider.ENV_VAR_FULL not in environ:
            raise ConfigError(f"capture.credentials.source greengrass: {ContainerProvider.ENV_VAR_FULL} is not set; make the component depend on aws.greengrass.TokenExchangeService")
        return ContainerProvider(environ=dict(environ))
    missing = [name for name, value in (("capture.credentials.endpoint", settings.endpoint), ("capture.credentials.role_alias", settings.role_alias), ("mqtt.cert", mqtt.cert), ("mqtt.key", mqtt.key)) if not value]
    if missing:
        raise ConfigError(f"capture uploads need {', '.join(missing)} for the AWS IoT credentials provider; set them, or capture.bucket null to keep captures on the device")
    return IotCredentialsProvider(settings.endpoint, settings.role_alias, thing_name, mqtt.cert, mqtt.key, settings.ca, settings.timeout_s)


def s3_client(provider: CredentialProvider, region: str | None, endpoint_url: str | None = None) -> Any:
    """A botocore S3 client whose only credentials are `provider`'s (fetched now: it may raise)."""
    session = get_session()
    session.register_component("credential_provider", CredentialResolver(providers=[provider]))
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise ConfigError("capture.region is not set (nor AWS_REGION); set it to the bucket's region")
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return session.create_client("s3", region_name=region, endpoint_url=endpoint_url, config=config)
