"""Versioned on-disk model store: bundles side by side, one active, the previous kept for rollback.

Layout: `<root>/<name>/<version>/` holds one unpacked bundle; `<root>/state.json` names the active and
the previous version. Every change is a rename: a version directory appears only complete (staged, fsynced,
renamed), and activation replaces state.json with `os.replace` then fsyncs the directory, so a crash at
any instant leaves either the old or the new state, both naming complete bundles.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.bundles.bundle import MAX_BUNDLE_BYTES, SEMVER, extract_zip
from agent.errors import ModelError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # the manifest's own name pattern
VERSION = re.compile(SEMVER)
STATE_FILE = "state.json"
STAGING_PREFIX = ".staging-"


def check_name_version(name: str, version: str) -> None:
    """Refuse a name or version that could leave its directory ('..', '/', '\\', anything unusual)."""
    if not isinstance(name, str) or not NAME.match(name) or name in (".", ".."):
        raise ModelError(f"model name {name!r} is not allowed (lowercase letters, digits, '.', '_', '-'); fix the update's name")
    if not isinstance(version, str) or not VERSION.match(version):
        raise ModelError(f"model version {version!r} is not a semantic version like 1.2.3; fix the update's version")


class StoredModel(BaseModel):
    """One installed version, and the sha256 of the artifact it came from (to recognise a repeat)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: str
    artifact_sha256: str | None = None


class StoreState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active: StoredModel | None = None
    previous: StoredModel | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, names in os.walk(root):
        for name in names:
            with open(Path(directory) / name, "rb") as stream:
                os.fsync(stream.fileno())
        _fsync_dir(Path(directory))


def replace_file(path: Path, data: bytes) -> None:
    """Write `path` so that a reader (or a crash) sees the old bytes or the new ones, nothing between
    (a hidden `.tmp` beside it, fsynced, renamed, the directory fsynced)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ModelStore:
    """Install, activate, roll back and prune model versions under one root directory."""

    def __init__(self, root: Path, keep: int = 3):
        self.root = Path(root)
        self.keep = max(keep, 2)  # active and previous are never pruned
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(f"model store {self.root}: cannot create it ({exc.strerror}); set updates.store to a writable directory") from None
        for leftover in self.root.glob(f"*/{STAGING_PREFIX}*"):  # an install a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in [*self.root.glob(".*.tmp"), *self.root.glob("*/.*.tmp")]:  # a write a crash interrupted
            leftover.unlink(missing_ok=True)

    def path(self, name: str, version: str) -> Path:
        check_name_version(name, version)
        return self.root / name / version

    def state(self) -> StoreState:
        """The active and previous versions; an empty state if nothing was ever activated."""
        path = self.root / STATE_FILE
        try:
            return StoreState.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return StoreState()
        except (OSError, ValidationError) as exc:
            raise ModelError(f"model store {path}: unreadable state ({type(exc).__name__}); restore it or remove it to start from the configured model") from None

    def install(self, artifact: Path, name: str, version: str, artifact_sha256: str | None = None, max_bytes: int = MAX_BUNDLE_BYTES) -> Path:
        """Unpack a bundle .zip (or copy a bundle directory) to `<name>/<version>/`; returns that directory.

        Only staging and a rename: nothing here is trusted yet (the caller verifies the installed copy).
        A version already installed is replaced unless it is active or previous (those are never touched).
        """
        target = self.path(name, version)
        state = self.state()
        if any(ref is not None and (ref.name, ref.version) == (name, version) for ref in (state.active, state.previous)):
            raise ModelError(f"model store: {name} {version} is already installed and in use; publish the update under a new version")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target.parent))
        try:
            if Path(artifact).is_dir():
                shutil.copytree(artifact, staging, dirs_exist_ok=True, symlinks=True)
            else:
                extract_zip(Path(artifact), staging, max_bytes)
            _fsync_tree(staging)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._write_meta(StoredModel(name=name, version=version, artifact_sha256=artifact_sha256))
        return target

    def _meta_path(self, name: str, version: str) -> Path:
        return self.root / name / f"{version}.json"

    def _write_meta(self, stored: StoredModel) -> None:
        replace_file(self._meta_path(stored.name, stored.version), stored.model_dump_json().encode())

    def stored(self, name: str, version: str) -> StoredModel:
        """What the store knows of an installed version (its artifact sha256 if it recorded one)."""
        try:
            return StoredModel.model_validate_json(self._meta_path(name, version).read_bytes())
        except (OSError, ValidationError):
            return StoredModel(name=name, version=version)

    def activate(self, name: str, version: str) -> StoreState:
        """Make an installed version the active one; the one it replaces becomes `previous`. Atomic."""
        if not self.path(name, version).is_dir():
            raise ModelError(f"model store: {name} {version} is not installed; install it before activating it")
        state = self.state()
        new = self.stored(name, version)
        previous = state.previous if state.active == new else state.active
        return self._set_state(StoreState(active=new, previous=previous))

    def rollback(self) -> StoreState:
        """Make the previous version active again (the failed one stays installed until pruned)."""
        state = self.state()
        if state.previous is None:
            raise ModelError("model store: no previous version to roll back to")
        return self._set_state(StoreState(active=state.previous, previous=None))

    def discard(self, name: str, version: str) -> None:
        """Remove an installed version that failed before activation (never the active or previous one)."""
        state = self.state()
        if any(ref is not None and (ref.name, ref.version) == (name, version) for ref in (state.active, state.previous)):
            return
        shutil.rmtree(self.path(name, version), ignore_errors=True)
        self._meta_path(name, version).unlink(missing_ok=True)

    def installed(self) -> list[StoredModel]:
        """Every installed version, oldest install first."""
        found = [
            (self._installed_at(path.parent.name, path.name), self.stored(path.parent.name, path.name))
            for path in self.root.glob("*/*")
            if path.is_dir() and not path.name.startswith(STAGING_PREFIX) and NAME.match(path.parent.name) and VERSION.match(path.name)
        ]
        return [stored for _, stored in sorted(found, key=lambda item: item[0])]

    def _installed_at(self, name: str, version: str) -> int:
        """When the version was installed: its record is written last (the directory keeps the bundle's times)."""
        meta = self._meta_path(name, version)
        return (meta if meta.exists() else self.path(name, version)).stat().st_mtime_ns

    def prune(self) -> list[StoredModel]:
        """Remove the oldest versions beyond `keep`, never the active or previous one; returns what went."""
        state = self.state()
        kept = {(ref.name, ref.version) for ref in (state.active, state.previous) if ref is not None}
        candidates = [s for s in self.installed() if (s.name, s.version) not in kept]
        removed = candidates[: max(len(candidates) - (self.keep - len(kept)), 0)]
        for stored in removed:
            self.discard(stored.name, stored.version)
        return removed

    def _set_state(self, state: StoreState) -> StoreState:
        replace_file(self.root / STATE_FILE, state.model_dump_json(indent=2).encode())
        return state

