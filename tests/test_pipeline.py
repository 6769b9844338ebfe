"""The loop on the real shipped model and real decoded frames: results, sequencing, hot swap, metrics."""

from __future__ import annotations

import io
import json

import jsonschema
import pytest
from conftest import SAMPLE_VIDEO

from agent.app import load_configured_model
from agent.inference.pipeline import Pipeline, Tuning
from agent.inference.slot import ModelSlot
from agent.messages import SequenceCounter
from agent.schemas import SCHEMA_DIR, render, schema_documents
from agent.settings import ModelSettings, Settings
from agent.sources import VideoFileSource
from agent.transport.base import TransportStats
from agent.transport.console import ConsoleTransport


class Recorder(ConsoleTransport):
    """The console transport writing into memory, so the test reads exactly what a user would see."""

    def __init__(self):
        self.out, self.side = io.StringIO(), io.StringIO()
        super().__init__(self.out, self.side)

    def lines(self, stream: io.StringIO) -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture(scope="module")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="module")
def model(settings):
    return load_configured_model(settings)


def make_pipeline(settings, model, transport, **tuning) -> Pipeline:
    tuning.setdefault("score_threshold", settings.model.score_threshold)
    return Pipeline(settings.source, ModelSlot(model), transport, SequenceCounter("test-thing"), Tuning(**tuning), source=VideoFileSource(SAMPLE_VIDEO))


def test_results_validate_against_the_published_schema(settings, model):
    transport = Recorder()
    stats = make_pipeline(settings, model, transport).run(max_frames=40)
    results = transport.lines(transport.out)
    assert stats.frames == 40 and results
    schema = json.loads((SCHEMA_DIR / "inference-result.schema.json").read_text())
    for result in results:
        jsonschema.validate(result, schema)
        assert result["model"]["version"] == model.manifest.version
        for prediction in result["predictions"]:
            assert prediction["label"] == str(prediction["class_index"])
            assert prediction["score"] >= settings.model.score_threshold
            box = prediction["box"]
            assert box["x"] + box["w"] <= 640 and box["y"] + box["h"] <= 480


def test_committed_schemas_match_the_models():
    """agent/schemas/*.json are generated (edge-agent schema); a model change without regenerating fails here."""
    for name, schema in schema_documents().items():
        assert (SCHEMA_DIR / name).read_text() == render(schema), f"run `edge-agent schema` to refresh {name}"


def test_sequence_has_no_gaps_for_published_results(settings, model):
    transport = Recorder()
    make_pipeline(settings, model, transport).run(max_frames=60)
    sequences = [r["sequence"] for r in transport.lines(transport.out)]
    assert sequences == list(range(1, len(sequences) + 1))


def test_publish_empty_gives_one_result_per_frame(settings, model):
    transport = Recorder()
    make_pipeline(settings, model, transport, publish_empty=True).run(max_frames=25)
    assert [r["frame"] for r in transport.lines(transport.out)] == list(range(25))


def test_threshold_one_publishes_nothing(settings, model):
    transport = Recorder()
    stats = make_pipeline(settings, model, transport, score_threshold=1.0).run(max_frames=20)
    assert stats.frames == 20 and transport.lines(transport.out) == []


def test_swap_takes_effect_on_the_next_frame(settings, model, tmp_path):
    """A second model (same weights, another version) swapped in between frames: earlier frames name the
    old version, every later one the new, none is lost or mixed."""
    import shutil

    from agent.bundles.bundle import read_manifest
    from agent.fleet.packing import write_manifest
    from agent.inference.model import load_model

    bundle = tmp_path / "v2"
    shutil.copytree(settings.model.bundle, bundle)
    raw, _ = read_manifest(bundle, str(bundle))
    raw.pop("files")
    raw["version"] = "9.9.9"
    write_manifest(bundle, raw)
    second = load_model(bundle, ModelSettings(trusted_keys=[], require_signature=False), settings.tasks)

    transport = Recorder()
    pipeline = make_pipeline(settings, model, transport, publish_empty=True)
    pipeline.run(max_frames=10)
    previous = pipeline.slot.swap(second)
    pipeline.run(max_frames=20)
    versions = [r["model"]["version"] for r in transport.lines(transport.out)]
    assert previous.ref.version == model.manifest.version
    assert versions == [model.manifest.version] * 10 + ["9.9.9"] * 10


def test_metrics_count_frames(settings, model):
    transport = Recorder()
    pipeline = make_pipeline(settings, model, transport)
    pipeline.run(max_frames=15)
    metrics = pipeline.metrics(interval_s=60)
    assert metrics.frames_read == 15 and metrics.latency_p50_ms > 0 and metrics.fps > 0


def test_stop_ends_the_loop(settings, model):
    transport = Recorder()
    pipeline = make_pipeline(settings, model, transport)
    pipeline.stop()
    assert pipeline.run().frames == 0


class DroppingRecorder(Recorder):
    """A transport whose outbox reports drops, as the spooled transport does when full."""

    dropped = 0

    def stats(self) -> TransportStats:
        return TransportStats(connected=True, dropped=self.dropped)


def test_outbox_drops_are_reported_on_the_status_topic(settings, model):
    transport = DroppingRecorder()
    pipeline = make_pipeline(settings, model, transport, metrics_interval_s=1e-6)
    transport.publish(pipeline.status("online"))
    pipeline.run(max_frames=3)
    transport.dropped = 7
    pipeline.run(max_frames=6)
    statuses = [m for m in transport.lines(transport.side) if m["kind"] == "status"]
    assert [s["outbox_dropped"] for s in statuses] == [0, 7]
    assert statuses[-1]["state"] == "online"  # the state stands; the count is what changed
