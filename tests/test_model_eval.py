"""Evaluation of the shipped model: it reproduces the figures its manifest records, meets the model
targets, and the golden-set gate refuses a model that does not read its own golden set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bundle_helpers import copy_bundle, repack, test_key  # noqa: F401 (fixture)
from conftest import MNIST, SHIPPED_BUNDLE, run_cli

from agent.bundles.bundle import open_bundle
from agent.errors import ModelError, Reason
from agent.inference.evaluate import MNIST_SHA256, evaluate, load_mnist
from agent.inference.model import load_model
from agent.settings import DEV_SIGNING_KEY, ModelSettings, TaskSettings

DEV_KEY = DEV_SIGNING_KEY  # the key that signs the shipped bundle


@pytest.fixture(scope="module")
def shipped_model():
    return load_model(SHIPPED_BUNDLE, ModelSettings(trusted_keys=[DEV_KEY], backend="litert"), TaskSettings())


def test_eval_reproduces_the_recorded_accuracy(shipped_model):
    result = evaluate(shipped_model, MNIST, repeats=200)
    print(result.model_dump_json())
    assert result.test_images == 10_000
    # int8 kernels are integer arithmetic: the same model gives the same answers here as where it was made.
    assert result.test_accuracy == pytest.approx(shipped_model.manifest.metrics.int8_accuracy, abs=0.0005)
    assert result.golden_accuracy >= shipped_model.manifest.min_golden_accuracy


def test_shipped_model_meets_its_targets(shipped_model):
    manifest = shipped_model.manifest
    metrics = manifest.metrics
    assert metrics.int8_accuracy >= 0.993
    assert metrics.float_accuracy - metrics.int8_accuracy <= 0.0015
    assert metrics.size_bytes == shipped_model.bundle.model_path.stat().st_size <= 120 * 1024
    assert (shipped_model.backend.inputs[0].dtype, shipped_model.backend.outputs[0].dtype) == ("int8", "int8")
    assert manifest.provenance.data_sha256 == MNIST_SHA256
    assert manifest.name == "mnist-int8"


def test_shipped_bundle_was_made_by_the_committed_training_program(shipped_model):
    """Editing models/mnist/*.py without retraining leaves a bundle nobody can rebuild: retrain and commit both."""
    from models.mnist.train import program_sha256

    assert shipped_model.manifest.provenance.program_sha256 == program_sha256()


def test_golden_set_is_mnist_test_images_with_their_labels(shipped_model):
    mnist = load_mnist(MNIST)
    bundle = shipped_model.bundle
    test_rows = {image.tobytes(): label for image, label in zip(mnist["x_test"], mnist["y_test"])}
    assert all(test_rows[image.tobytes()] == label for image, label in zip(bundle.golden_x, bundle.golden_y))
    assert np.bincount(bundle.golden_y, minlength=10).min() > 0


def test_golden_gate_refuses_a_model_that_misreads_its_golden_set(tmp_path, test_key):
    bundle = copy_bundle(tmp_path / "b")
    golden = open_bundle(SHIPPED_BUNDLE, trusted_keys=[DEV_KEY])
    np.savez(bundle / "golden.npz", x=golden.golden_x, y=(golden.golden_y + 1) % 10)
    repack(bundle, test_key[0])
    model = load_model(bundle, ModelSettings(trusted_keys=[test_key[1]]), TaskSettings())
    with pytest.raises(ModelError, match="below the bundle's minimum") as caught:
        model.check_golden()
    assert "\n" not in str(caught.value) and caught.value.reason == Reason.GOLDEN_ACCURACY


def test_mnist_loader_refuses_a_file_that_is_not_mnist(tmp_path):
    fake = tmp_path / "mnist.npz"
    np.savez(fake, x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ModelError, match="is not MNIST's"):
        load_mnist(fake)


def test_edge_agent_model_eval_prints_the_figures():
    result = run_cli("model", "eval", SHIPPED_BUNDLE, "--trusted-key", DEV_KEY)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    print(figures)
    assert figures["test_accuracy"] == pytest.approx(figures["recorded_int8_accuracy"], abs=0.0005)
    assert figures["invoke_p50_us"] > 0 and figures["golden_accuracy"] >= figures["min_golden_accuracy"]
