"""The device's TLS files and the endpoint's certificate, checked so that a mistake is one line naming it.

awscrt says little about either: a certificate, key or CA that is not PEM, or a key that does not belong to
the certificate, is a bare RuntimeError (AWS_ERROR_INVALID_ARGUMENT, AWS_IO_TLS_CTX_ERROR); and an endpoint
whose certificate the CA does not verify is AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE, which s2n holds back 10
to 30 s (blinding) and which reads the same as the endpoint refusing our certificate. The files are read
with `cryptography`, and the endpoint's certificate is verified with OpenSSL (the standard library's ssl),
which says which certificate failed and why.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import TransportError

# setting -> (what it holds, the openssl command that turns DER into it)
FILES = {
    "cert": ("device certificate", "openssl x509 -inform der"),
    "key": ("private key", "openssl pkey -inform der"),
    "ca": ("CA certificate", "openssl x509 -inform der"),
}


def _unreadable(setting: str, path: Path, found: bytes) -> TransportError:
    """A file that is not the PEM it should be: say what it seems to hold instead (cert and key swapped)."""
    what, convert = FILES[setting]
    held = ""
    if b"PRIVATE KEY-----" in found:
        held = " (it holds a private key: are --cert and --key swapped?)"
    elif b"-----BEGIN CERTIFICATE-----" in found:
        held = " (it holds a certificate: are --cert and --key swapped?)"
    elif not found.lstrip().startswith(b"-----BEGIN"):
        held = f" (not PEM text; DER converts with `{convert}`)"
    return TransportError(f"mqtt.{setting} {path}: not a PEM {what}{held}; pass --{setting} with the {what} file")


def check_credentials(cert: Path, key: Path, ca: Path) -> None:
    """TransportError naming the file when the certificate, key or CA is not PEM, or the key is not the
    certificate's."""
    texts = {}
    for setting, path in (("cert", cert), ("key", key), ("ca", ca)):
        try:
            texts[setting] = Path(path).read_bytes()
        except OSError as error:
            raise TransportError(f"mqtt.{setting} {path}: cannot read it ({error.strerror}); the agent's user needs read access") from None
    try:
        certificate = x509.load_pem_x509_certificate(texts["cert"])
    except ValueError:
        raise _unreadable("cert", cert, texts["cert"]) from None
    try:
        private_key = serialization.load_pem_private_key(texts["key"], password=None)
    except TypeError:  # a password-protected key
        raise TransportError(f"mqtt.key {key}: the private key is encrypted; the agent needs it unencrypted (mode 0600), as IoT Core issues it") from None
    except ValueError:
        raise _unreadable("key", key, texts["key"]) from None
    try:
        x509.load_pem_x509_certificates(texts["ca"])
    except ValueError:
        raise _unreadable("ca", ca, texts["ca"]) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != private_key.public_key().public_bytes(*spki):
        raise TransportError(f"mqtt.key {key} is not the private key of mqtt.cert {cert}; pass the key that was created with this certificate")


def server_certificate_problem(endpoint: str, port: int, ca: Path, timeout_s: float) -> str | None:
    """Why `endpoint:port`'s certificate fails verification against `ca` (which no retry can fix), or None
    when it passes or the endpoint cannot be reached right now (retrying may fix that)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name, like awscrt
    context.load_verify_locations(cafile=str(ca))
    try:
        with socket.create_connection((endpoint, port), timeout=timeout_s) as raw, context.wrap_socket(raw, server_hostname=endpoint):
            return None
    except ssl.SSLCertVerificationError as error:
        if error.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            return f"its certificate is not issued for that name ({error.verify_message}); mqtt.endpoint must be a name the endpoint's certificate carries"
        return (
            f"its certificate is not verified by mqtt.ca {ca} ({error.verify_message}); pass --ca with the CA "
            "that signed the endpoint's certificate (Amazon Root CA 1, the default, for IoT Core)"
        )
    except (OSError, ValueError):  # refused, reset, timed out, a handshake the server ended: not ours to judge
        return None
