"""Ed25519 keys and signatures for model bundles.

A fleet operator signs a bundle's canonical manifest with a private key kept off the devices; devices hold
only public keys (PEM) and accept a bundle signed by one of them. A key is named by its key id (the first
16 hex digits of the sha256 of its raw 32-byte public key), which the signature file carries so a device
can tell "signed by a key I do not trust" from "signature does not match".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import ModelError, OutputError, Reason, writing

# Where `edge-fleet model keygen` puts a private key by default: outside any repository.
DEFAULT_PRIVATE_KEY = Path("~/.config/edge-agent/dev-signing.key").expanduser()


class Signature(BaseModel):
    """Content of manifest.sig."""

    model_config = ConfigDict(extra="forbid")

    algorithm: str = Field("ed25519", pattern="^ed25519$")
    key_id: str = Field(pattern="^[0-9a-f]{16}$")
    signature: str = Field(description="base64 of the 64-byte Ed25519 signature of the canonical manifest")


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(private_path: Path, public_path: Path) -> str:
    """Write a new private key (mode 0600, never overwriting) and its public half; returns the key id."""
    private_path, public_path = Path(private_path).expanduser(), Path(public_path).expanduser()
    for path in (private_path, public_path):
        if path.exists():
            raise ModelError(f"{path} already exists; move it away or choose another path (keys are never overwritten)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    for option, path in (("--key", private_path), ("--public", public_path)):  # both folders before any key is written
        with writing(option, path):
            path.parent.mkdir(parents=True, exist_ok=True)
    with writing("--key", private_path):
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(private_pem)
    try:
        with writing("--public", public_path):
            public_path.write_bytes(public_pem)
    except OutputError:
        private_path.unlink()  # no private key without its public half, so trying again is not "already exists"
        raise
    return key_id(key.public_key())


def _load_key(path: Path, read, wanted: type, role: str, fix: str):
    path = Path(path).expanduser()
    try:
        key = read(path.read_bytes())
    except OSError as exc:
        raise ModelError(f"{role} {path}: cannot read it ({exc.strerror}); {fix}") from None
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, wanted):
        raise ModelError(f"{role} {path}: not an unencrypted PEM Ed25519 key; {fix}")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    read = lambda data: serialization.load_pem_private_key(data, password=None)  # noqa: E731
    return _load_key(path, read, Ed25519PrivateKey, "signing key", "create one with `edge-fleet model keygen`")


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _load_key(path, serialization.load_pem_public_key, Ed25519PublicKey, "trusted key", "fix model.trusted_keys")


def sign(message: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The manifest.sig bytes for `message` (the canonical manifest)."""
    signature = Signature(key_id=key_id(private_key.public_key()), signature=base64.b64encode(private_key.sign(message)).decode())
    return (signature.model_dump_json(indent=2) + "\n").encode()


def verify(message: bytes, signature_bytes: bytes, trusted_keys: Sequence[Path], where: str) -> str:
    """Check manifest.sig against `message`; returns the signer's key id, or raises ModelError."""
    try:
        signature = Signature.model_validate(json.loads(signature_bytes))
        raw = base64.b64decode(signature.signature, validate=True)
    except (ValueError, ValidationError):
        raise ModelError(f"{where}: manifest.sig is not a valid signature file; re-sign with `edge-fleet model sign`", Reason.BAD_SIGNATURE) from None
    keys = {key_id(key): key for key in map(load_public_key, trusted_keys)}
    if signature.key_id not in keys:
        trusted = ", ".join(sorted(keys)) or "none"
        raise ModelError(f"{where}: signed by untrusted key {signature.key_id} (trusted: {trusted}); add its public key to model.trusted_keys or re-sign", Reason.UNTRUSTED_KEY)
    try:
        keys[signature.key_id].verify(raw, message)
    except InvalidSignature:
        raise ModelError(f"{where}: manifest.json does not match its signature (tampered or re-packed after signing); re-sign with `edge-fleet model sign`", Reason.BAD_SIGNATURE) from None
    return signature.key_id
