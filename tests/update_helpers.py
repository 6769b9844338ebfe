"""What the update tests share: bundles derived from the shipped one, job documents, a pipeline serving video.

Used by test_updates.py, test_jobs.py, test_shadow.py and benchmarks/bench_update.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from artifact_server import serve
from conftest import SAMPLE_VIDEO, SHIPPED_BUNDLE

from agent.app import load_configured_model
from agent.bundles.signing import generate_key
from agent.fleet.packing import sign_bundle, write_manifest, write_zip
from agent.inference.pipeline import Pipeline, Tuning
from agent.inference.slot import ModelSlot
from agent.messages import SequenceCounter
from agent.settings import (
    DownloadSettings,
    ModelSettings,
    Settings,
    ShadowSettings,
    SourceSettings,
    UpdateSettings,
)
from agent.transport.console import ConsoleTransport
from agent.updates.manager import UpdateManager

DATA = Path(__file__).resolve().parent / "data"
SERVING = json.loads((SHIPPED_BUNDLE / "manifest.json").read_text())["version"]
MAJOR = int(SERVING.split(".")[0]) + 1


def later(minor: int = 0) -> str:
    """A version newer than the shipped bundle's."""
    return f"{MAJOR}.{minor}.0"


NEW = later()


def make_bundle(folder: Path, key: Path | None, *, version=NEW, model: Path | None = None, golden=None, tamper=None, **fields) -> bytes:
    """A bundle .zip derived from the shipped one with the fleet's own packing and signing functions."""
    root = folder / f"bundle-{version}-{len(list(folder.iterdir()))}"
    shutil.copytree(SHIPPED_BUNDLE, root)
    (root / "manifest.sig").unlink()
    if model is not None:
        shutil.copyfile(model, root / "model.tflite")
    if golden is not None:
        np.savez(root / "golden.npz", x=golden[0], y=golden[1])
    raw = json.loads((root / "manifest.json").read_text())
    raw.pop("files")
    write_manifest(root, {**raw, "version": version, **fields})
    if key is not None:
        sign_bundle(root, key)
    if tamper is not None:
        tamper(root)
    write_zip(root, folder / "out.zip")
    return (folder / "out.zip").read_bytes()


def document(url: str, data: bytes, **fields) -> dict:
    return {"operation": "model-update", "name": "mnist-int8", "version": NEW, "url": url, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **fields}


class FrameLog:
    """Observer: which frame was served by which model version (publish_empty makes every frame a result)."""

    def __init__(self):
        self.frames: list[tuple[int, str]] = []
        self.times: list[float] = []  # time.monotonic() when each result was made

    def on_frame(self, frame, result, latency_ms):
        self.frames.append((frame.index, result.model.version))
        self.times.append(time.monotonic())

    def versions(self) -> list[str]:
        return [version for _, version in self.frames]


class Serving:
    """A real pipeline on the sample video at 30 fps, on its own thread, with an update manager beside it."""

    def __init__(self, store: Path, trusted_keys: list[Path], ca_file: Path | None, **update_settings):
        """`update_settings` are UpdateSettings fields, and `source` and `shadow` sections (dicts) over the defaults."""
        download = DownloadSettings(**{"ca_file": ca_file, "retries": 2, "backoff_initial_s": 0.01, **update_settings.pop("download", {})})
        source = SourceSettings(**{"spec": str(SAMPLE_VIDEO), "loop": True, "pace_fps": 30, **update_settings.pop("source", {})})
        shadow = ShadowSettings(**update_settings.pop("shadow", {}))
        updates = UpdateSettings(**{"store": store, "health_frames": 10, "health_timeout_s": 20, "download": download, **update_settings})
        settings = Settings(source=source, model=ModelSettings(trusted_keys=[*ModelSettings().trusted_keys, *trusted_keys]), updates=updates, shadow=shadow)
        self.settings = updates
        self.slot = ModelSlot(load_configured_model(settings))
        self.pipeline = Pipeline(settings.source, self.slot, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter("t"), Tuning(publish_empty=True))
        self.log = FrameLog()
        self.pipeline.add_observer(self.log)
        self.pipeline.add_observer(self)
        self.stopping = threading.Event()
        self.manager = UpdateManager.serving(settings, self.pipeline)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.wait_frames(5)

    def _run(self):
        try:
            self.pipeline.run()
        except BaseException as exc:  # surfaced by the test's assertions
            self.error = exc

    def wait_frames(self, count: int) -> None:
        target = len(self.log.frames) + count
        while len(self.log.frames) < target and self.thread.is_alive():
            threading.Event().wait(0.01)

    def on_frame(self, frame, result, latency_ms):
        if self.stopping.is_set():  # stopped from its own thread: closing a capture mid-read crashes OpenCV
            self.pipeline.stop()

    def stop(self):
        self.wait_frames(5)
        self.stopping.set()
        self.thread.join(10)

    def assert_no_frame_lost(self):
        assert self.error is None and self.thread.is_alive()
        indices = [index for index, _ in self.log.frames]
        assert indices == list(range(indices[0], indices[0] + len(indices))), "a frame was skipped"
        assert self.pipeline.source.stats.corrupt == 0


# -- fixtures (import them into a test module by name) -----------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A signing key the device trusts and one it does not (generated here; never committed)."""
    folder = tmp_path_factory.mktemp("keys")
    generate_key(folder / "trusted.key", folder / "trusted.pub")
    generate_key(folder / "stranger.key", folder / "stranger.pub")
    return folder


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    server, stop = serve(tmp_path_factory.mktemp("https"))
    yield server
    stop()


@pytest.fixture
def serving(tmp_path, keys, artifacts):
    made = []

    def start(**update_settings) -> Serving:
        made.append(Serving(tmp_path / "store", [keys / "trusted.pub"], artifacts.ca_file, **update_settings))
        return made[-1]

    yield start
    for s in made:
        s.stop()
