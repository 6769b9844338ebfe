"""Building bundle variants for the bundle and evaluation tests: copies of the shipped bundle, edited,
re-packed and signed with keys the tests generate (the development private key is never needed)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SHIPPED_BUNDLE

from agent.bundles.signing import generate_key
from agent.fleet.packing import sign_bundle, write_manifest


@pytest.fixture(scope="session")
def test_key(tmp_path_factory) -> tuple[Path, Path]:
    """(private, public) key pair made for this test session."""
    folder = tmp_path_factory.mktemp("keys")
    generate_key(folder / "test.key", folder / "test.pub")
    return folder / "test.key", folder / "test.pub"


@pytest.fixture(scope="session")
def other_key(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("other-keys")
    generate_key(folder / "other.key", folder / "other.pub")
    return folder / "other.key", folder / "other.pub"


def copy_bundle(dest: Path) -> Path:
    """The shipped bundle's files, unsigned."""
    shutil.copytree(SHIPPED_BUNDLE, dest, ignore=shutil.ignore_patterns("manifest.sig"))
    return dest


def repack(bundle: Path, private_key: Path | None, edit: Callable[[dict], None] = lambda raw: None) -> Path:
    """Re-hash a bundle's files into its manifest (after `edit` changed its fields) and sign it if a key."""
    raw = json.loads((bundle / "manifest.json").read_text())
    raw.pop("files")
    edit(raw)
    write_manifest(bundle, raw)
    if private_key is not None:
        sign_bundle(bundle, private_key)
    return bundle


def make_bundle(dest: Path, private_key: Path | None, edit: Callable[[dict], None] = lambda raw: None) -> Path:
    """A copy of the shipped bundle, its manifest fields edited, re-packed and (if a key) signed."""
    return repack(copy_bundle(dest), private_key, edit)


def write_signed_raw(bundle: Path, raw: dict, private_key: Path) -> None:
    """Write and sign a manifest as given, unchecked: how a hostile or buggy packer would."""
    from agent.bundles.bundle import canonical_bytes
    from agent.bundles.signing import load_private_key, sign

    (bundle / "manifest.json").write_text(json.dumps(raw))
    (bundle / "manifest.sig").write_bytes(sign(canonical_bytes(raw), load_private_key(private_key)))
