"""Which keys may vouch for the model an agent starts with.

A fleet's devices trust only the fleet's own keys (`model.trusted_keys`) for every bundle the fleet sends.
The bundle shipped in the package is signed by a development key, so a device that trusts only its fleet
would refuse the model it was installed with. It need not: that bundle came in the same package as the
code that checks it, so a starting model that *is* the shipped bundle (the same manifest, so every file
has the shipped sha256) is also accepted with the development keys shipped beside it. Nothing else is:
updates, and any other starting bundle, answer to `model.trusted_keys` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from agent.bundles.bundle import read_manifest
from agent.errors import ModelError
from agent.settings import DEV_SIGNING_KEYS, SHIPPED_BUNDLE


def starting_keys(bundle: Path, trusted_keys: Sequence[Path]) -> list[Path]:
    """The keys the starting `bundle` is checked with: `trusted_keys`, plus the shipped development keys
    when the bundle is the one shipped in the package."""
    keys = list(trusted_keys)
    manifest = _manifest(Path(bundle))
    if manifest is not None and manifest == _manifest(SHIPPED_BUNDLE):
        keys += [key for key in DEV_SIGNING_KEYS if key not in keys]
    return keys


def _manifest(bundle: Path) -> bytes | None:
    """A bundle directory's canonical manifest; None for a .zip or an unreadable bundle (load_model says why)."""
    if not bundle.is_dir():
        return None
    try:
        return read_manifest(bundle, str(bundle))[1]
    except (ModelError, OSError):
        return None
