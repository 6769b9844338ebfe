"""Stand-ins for the two places a device gets temporary AWS credentials, speaking their HTTP APIs.

- `IotCredentialsProvider`: the AWS IoT credentials provider. HTTPS on a free loopback port with mutual TLS
  (client certificates from the test CA, tests/broker.py's Pki): `GET /role-aliases/{alias}/credentials`,
  the thing named in `x-amzn-iot-thingname` must be the certificate's thing (here: its CN); answers
  `{"credentials": {accessKeyId, secretAccessKey, sessionToken, expiration}}`, 403 or 404 with
  `{"message": ...}` as AWS does.
- `ContainerCredentials`: Greengrass's token exchange service as components see it: plain HTTP on loopback,
  the `Authorization` header must be the component's AWS_CONTAINER_AUTHORIZATION_TOKEN; answers the
  container credentials JSON botocore's ContainerProvider reads (AccessKeyId, SecretAccessKey, Token, Expiration).

Both record every request, for tests to assert on. The credentials they hand out are made up: moto accepts any.
"""

from __future__ import annotations

import json
import secrets
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from broker import Pki

THING_HEADER = "x-amzn-iot-thingname"


@dataclass(frozen=True)
class Request:
    path: str
    thing_header: str | None
    certificate_thing: str | None  # the client certificate's CN (None: no certificate)
    authorization: str | None
    status: int


def made_up_credentials(duration_s: int) -> dict[str, str]:
    expiration = (datetime.now(timezone.utc) + timedelta(seconds=duration_s)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"AccessKeyId": "ASIA" + secrets.token_hex(8).upper(), "SecretAccessKey": secrets.token_urlsafe(30), "Token": secrets.token_urlsafe(60), "Expiration": expiration}


class _Server:
    """A threaded HTTP server on a free loopback port, recording requests."""

    def __init__(self, handle):
        self.requests: list[Request] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                status, body = handle(self)
                outer.requests.append(Request(self.path, self.headers.get(THING_HEADER), _peer_thing(self), self.headers.get("Authorization"), status))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _peer_thing(handler: BaseHTTPRequestHandler) -> str | None:
    getpeercert = getattr(handler.connection, "getpeercert", None)
    certificate = getpeercert() if getpeercert else None
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class IotCredentialsProvider(_Server):
    """`role_aliases`: alias -> credential duration (s). A certificate's thing is its CN (AttachThingPrincipal)."""

    def __init__(self, pki: Pki, role_aliases: dict[str, int]):
        self.role_aliases = role_aliases
        super().__init__(self._answer)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        context.load_verify_locations(str(pki.ca.path))
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no device certificate, no handshake
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)

    @property
    def endpoint(self) -> str:
        return f"localhost:{self.port}"

    def _answer(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict]:
        parts = handler.path.split("/")
        if len(parts) != 4 or parts[1] != "role-aliases" or parts[3] != "credentials":
            return 404, {"message": "Not Found"}
        if parts[2] not in self.role_aliases:
            return 404, {"message": "Role alias does not exist"}
        thing = handler.headers.get(THING_HEADER)
        if thing is not None and thing != _peer_thing(handler):
            return 403, {"message": "Access Denied"}  # the thing is not attached to this certificate
        made = made_up_credentials(self.role_aliases[parts[2]])
        return 200, {"credentials": {"accessKeyId": made["AccessKeyId"], "secretAccessKey": made["SecretAccessKey"], "sessionToken": made["Token"], "expiration": made["Expiration"]}}


class ContainerCredentials(_Server):
    """The token exchange service: `uri` and `token` are what the nucleus puts in a component's environment."""

    PATH = "/2016-11-01/credentialprovider/"

    def __init__(self, duration_s: int = 3600):
        self.token = secrets.token_hex(16)
        self.duration_s = duration_s
        super().__init__(self._answer)

    @property
    def uri(self) -> str:
        return f"http://localhost:{self.port}{self.PATH}"

    def _answer(self, handler: BaseHTTPRequestHandler) -> tuple[int, dict]:
        if handler.path != self.PATH:
            return 404, {"message": "Not Found"}
        if handler.headers.get("Authorization") != self.token:
            return 403, {"message": "Access Denied"}
        return 200, made_up_credentials(self.duration_s)
