"""The versioned model store: side-by-side installs, atomic activation, rollback, pruning, unsafe names."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.bundles.bundle import open_bundle
from agent.bundles.store import ModelStore, StoredModel
from agent.errors import ModelError
from agent.fleet.packing import write_zip
from agent.settings import DEV_SIGNING_KEY


def test_installs_side_by_side_and_activates_with_previous_kept(tmp_path, shipped_bundle):
    store = ModelStore(tmp_path / "store")
    first = store.install(shipped_bundle, "mnist-int8", "0.1.0", "a" * 64)
    zipped = tmp_path / "bundle.zip"
    write_zip(shipped_bundle, zipped)
    second = store.install(zipped, "mnist-int8", "0.2.0")

    assert first == tmp_path / "store" / "mnist-int8" / "0.1.0"
    assert second == tmp_path / "store" / "mnist-int8" / "0.2.0"
    for path in (first, second):  # both complete, verifiable bundles
        assert open_bundle(path, trusted_keys=[DEV_SIGNING_KEY]).manifest.name == "mnist-int8"

    store.activate("mnist-int8", "0.1.0")
    state = store.activate("mnist-int8", "0.2.0")
    assert state.active == StoredModel(name="mnist-int8", version="0.2.0")
    assert state.previous == StoredModel(name="mnist-int8", version="0.1.0", artifact_sha256="a" * 64)
    assert ModelStore(tmp_path / "store").state() == state  # persisted

    state = store.rollback()
    assert state.active.version == "0.1.0" and state.previous is None
    with pytest.raises(ModelError, match="no previous version"):
        store.rollback()


def test_activating_the_active_version_again_keeps_previous(tmp_path, shipped_bundle):
    store = ModelStore(tmp_path)
    for version in ("1.0.0", "1.1.0"):
        store.install(shipped_bundle, "m", version)
        store.activate("m", version)
    state = store.activate("m", "1.1.0")
    assert (state.active.version, state.previous.version) == ("1.1.0", "1.0.0")


@pytest.mark.parametrize(
    "name, version",
    [("../evil", "1.0.0"), ("m", "../../etc"), ("m/x", "1.0.0"), ("..", "1.0.0"), ("m", "1.0.0/../../x"), ("/abs", "1.0.0"), ("m", "1.0.0\\..\\x"), ("M", "1.0")],
)
def test_unsafe_names_and_versions_are_refused_before_touching_disk(tmp_path, shipped_bundle, name, version):
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelError, match="not allowed|not a semantic version"):
        store.install(shipped_bundle, name, version)
    with pytest.raises(ModelError):
        store.activate(name, version)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list((tmp_path / "store").iterdir()) == []


def test_a_version_in_use_is_never_replaced_or_discarded(tmp_path, shipped_bundle):
    store = ModelStore(tmp_path)
    store.install(shipped_bundle, "m", "1.0.0")
    store.activate("m", "1.0.0")
    with pytest.raises(ModelError, match="in use"):
        store.install(shipped_bundle, "m", "1.0.0")
    store.discard("m", "1.0.0")
    assert store.path("m", "1.0.0").is_dir()


def test_activating_a_version_that_is_not_installed_is_refused(tmp_path):
    with pytest.raises(ModelError, match="not installed"):
        ModelStore(tmp_path).activate("m", "1.0.0")


def test_prune_keeps_the_newest_and_never_active_or_previous(tmp_path, shipped_bundle):
    store = ModelStore(tmp_path, keep=3)
    for minor in range(6):
        store.install(shipped_bundle, "m", f"1.{minor}.0")
        time.sleep(0.01)  # distinct install times
    store.activate("m", "1.0.0")
    store.activate("m", "1.1.0")  # active 1.1.0, previous 1.0.0: the two oldest
    removed = store.prune()
    assert [s.version for s in removed] == ["1.2.0", "1.3.0", "1.4.0"]
    assert [s.version for s in store.installed()] == ["1.0.0", "1.1.0", "1.5.0"]


def test_an_interrupted_install_leaves_no_trace(tmp_path, shipped_bundle):
    store = ModelStore(tmp_path)
    leftover = tmp_path / "m" / ".staging-abc"
    leftover.mkdir(parents=True)
    (leftover / "model.tflite").write_bytes(b"half")
    ModelStore(tmp_path)
    assert not leftover.exists()
    assert store.installed() == []


def test_a_corrupt_bundle_zip_is_not_installed(tmp_path):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelError, match="not a readable bundle zip"):
        store.install(broken, "m", "1.0.0")
    assert store.installed() == []


FLIPPER = textwrap.dedent(
    """
    import sys
    from agent.bundles.store import ModelStore
    store = ModelStore(sys.argv[1])
    print("ready", flush=True)
    while True:
        for version in ("1.0.0", "2.0.0"):
            store.activate("m", version)
    """
)


def test_a_crash_at_any_moment_of_activation_leaves_a_valid_active_model(tmp_path, shipped_bundle):
    """Kill a process that activates versions back to back at random moments; the store always reopens valid."""
    store = ModelStore(tmp_path)
    for version in ("1.0.0", "2.0.0"):
        store.install(shipped_bundle, "m", version)
    store.activate("m", "1.0.0")
    rng = random.Random(6)
    for _ in range(8):
        process = subprocess.Popen([sys.executable, "-c", FLIPPER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait()
        reopened = ModelStore(tmp_path)
        state = reopened.state()
        assert state.active is not None and state.active.version in ("1.0.0", "2.0.0")
        assert state.previous is not None and state.previous.version != state.active.version
        open_bundle(store.path("m", state.active.version), trusted_keys=[DEV_SIGNING_KEY])
    assert not list(Path(tmp_path).glob(".*.tmp"))  # a write the kill interrupted is cleaned up on open
