"""Making bundles: hash the files into the manifest, sign it, zip it (reproducibly).

Shared by the training program and `edge-fleet model pack|sign`, so a bundle is built one way only.
The checks a device makes live in agent/bundles/bundle.py; this module writes what that one reads.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from agent.bundles.bundle import (
    MANIFEST,
    SIGNATURE,
    ManifestBase,
    canonical_bytes,
    extract_zip,
    parse_manifest,
    read_manifest,
    sha256_file,
)
from agent.bundles.signing import key_id, load_private_key, sign
from agent.errors import ModelError, writing

# The operator's own bundles: only a sanity bound (devices apply model.max_bundle_mb).
OPERATOR_MAX_BYTES = 1 << 30
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same files always give the same zip bytes


def _content_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in (MANIFEST, SIGNATURE))


def write_manifest(root: Path, fields: dict[str, Any]) -> ManifestBase:
    """Write root/manifest.json from `fields` plus the sha256 of every other file; returns it validated.

    A manifest.sig left from before is removed when the manifest changed, since it no longer matches.
    """
    root = Path(root)
    raw = {**fields, "files": {p.relative_to(root).as_posix(): sha256_file(p) for p in _content_files(root)}}
    manifest = parse_manifest(raw, f"{root}: {MANIFEST}")
    raw = manifest.model_dump(mode="json")
    path = root / MANIFEST
    previous = canonical_bytes(json.loads(path.read_bytes())) if path.exists() else None
    path.write_text(json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    if previous != canonical_bytes(raw):
        (root / SIGNATURE).unlink(missing_ok=True)
    return manifest


def pack(root: Path) -> ManifestBase:
    """Refresh the file hashes of an existing bundle directory's manifest.json."""
    root = Path(root)
    if not root.is_dir():
        raise ModelError(f"{root}: not a bundle directory; pass the directory holding manifest.json and model.tflite")
    raw, _ = read_manifest(root, str(root))
    raw.pop("files", None)
    return write_manifest(root, raw)


def write_zip(root: Path, zip_path: Path, option: str = "zip") -> None:
    """Zip a bundle directory (files at the zip's top level, sorted, fixed times); its folder is created if
    missing. A zip that cannot be written there is an OutputError naming `option` (what the user gave)."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file())
    tmp = zip_path.with_name(zip_path.name + ".part")
    with writing(option, zip_path):
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for path in files:
                    info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=ZIP_TIME)
                    info.external_attr = 0o100644 << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    archive.writestr(info, path.read_bytes())
            os.replace(tmp, zip_path)
        finally:
            tmp.unlink(missing_ok=True)


def sign_bundle(bundle: Path, private_key: Path) -> str:
    """Write manifest.sig into a bundle directory or .zip; returns the signing key's id."""
    bundle = Path(bundle)
    key = load_private_key(private_key)
    if bundle.is_dir():
        raw, message = read_manifest(bundle, str(bundle))
        parse_manifest(raw, f"{bundle}: {MANIFEST}")
        (bundle / SIGNATURE).write_bytes(sign(message, key))
        return key_id(key.public_key())
    if not bundle.is_file():
        raise ModelError(f"{bundle}: no such bundle; pass a bundle directory or .zip")
    with tempfile.TemporaryDirectory(prefix="edge-sign-") as tmp:
        extract_zip(bundle, Path(tmp), max_bytes=OPERATOR_MAX_BYTES)
        signer = sign_bundle(Path(tmp), private_key)
        write_zip(Path(tmp), bundle)
    return signer
