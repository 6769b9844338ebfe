"""Every backend the agent ships, on the shipped bundle's golden set, against the reference (litert):
the same top-1 on every golden image and dequantized scores within one output quantization step.
Plus the registry, backend settings, external delegates, the previous bundle version, and the bench.

tflite-runtime needs numpy<2: its agreement is measured with .venv-tflite's Python (built by `make test`),
and `make test-tflite` runs the cases marked tflite_runtime here inside that environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, SHIPPED_BUNDLE, agent_env, assert_one_line_error, one_line_error, run_cli

from agent.bundles.bundle import open_bundle
from agent.bundles.signing import key_id, load_public_key
from agent.errors import ConfigError, ModelError
from agent.inference.backends import available_backends, backend_names, open_backend
from agent.inference.backends.base import TensorSpec
from agent.inference.tasks.mnist_digits import classify_digits
from agent.settings import (
    BACKEND_SETTINGS,
    DEV_SIGNING_KEY,
    DEV_SIGNING_KEYS,
    PREVIOUS_DEV_SIGNING_KEY,
    deep_merge,
    load_settings,
    validate_settings,
)

PREVIOUS_BUNDLE = REPO / "tests" / "data" / "mnist-int8-1.0.0.zip"  # signed by the previous development key
TFLITE_PYTHON = REPO / ".venv-tflite" / "bin" / "python"
HAS_LITERT = "litert" in available_backends()


def classify(backend, images: np.ndarray) -> np.ndarray:
    """Float digits (N, 28, 28) -> dequantized scores, one invoke each, as the mnist-digits task runs them."""
    return classify_digits(backend.run, backend.inputs[0], backend.outputs[0], images)


def needs(backend: str):
    return pytest.mark.skipif(backend not in available_backends(), reason=f"{backend} is not installed here (make test installs it)")


@pytest.fixture(scope="module")
def bundle():
    return open_bundle(SHIPPED_BUNDLE, trusted_keys=list(DEV_SIGNING_KEYS))


def golden_scores(bundle, settings: dict) -> tuple[np.ndarray, float]:
    """Dequantized golden-set scores of a backend, and its output scale."""
    backend = open_backend(bundle.root, bundle.manifest.files, validate_settings({"model": {"backend": settings}}).model.backend)
    try:
        return classify(backend, bundle.golden_x.astype(np.float32) / 255.0), backend.outputs[0].scale
    finally:
        backend.close()


@pytest.fixture(scope="module")
def reference(bundle):
    if not HAS_LITERT:
        pytest.skip("the reference backend (litert) runs in the main environment")
    return golden_scores(bundle, {"type": "litert"})[0]


def assert_agrees(scores: np.ndarray, reference: np.ndarray, scale: float, bundle) -> None:
    """Same top-1 on every golden image, every score within one quantization step, and the gate passed."""
    same = np.argmax(scores, axis=1) == np.argmax(reference, axis=1)
    assert same.all(), f"top-1 differs on golden images {np.flatnonzero(~same).tolist()}"
    steps = float(np.max(np.abs(scores - reference))) / scale
    print(f"largest difference from the reference: {steps:.2f} quantization steps")
    assert steps <= 1.0 + 1e-6
    assert np.mean(np.argmax(scores, axis=1) == bundle.golden_y) >= bundle.manifest.min_golden_accuracy


# ---- TensorSpec ----------------------------------------------------------------------------------------

def test_float_tensors_pass_through():
    spec = TensorSpec(name="x", shape=(2,), dtype="float32", scale=0.0, zero_point=0)
    values = np.array([0.1, 0.9], np.float64)
    assert spec.quantize(values).dtype == np.float32 and spec.dequantize(spec.quantize(values)).tolist() == pytest.approx([0.1, 0.9])


# ---- every backend agrees with the reference ---------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    pytest.param({"type": "litert", "threads": 2}, id="litert-2-threads"),
    pytest.param({"type": "litert-compiled"}, id="litert-compiled-cpu", marks=needs("litert-compiled")),
    pytest.param({"type": "litert-compiled", "threads": 2}, id="litert-compiled-cpu-2-threads", marks=needs("litert-compiled")),
    pytest.param({"type": "litert-compiled", "accelerator": "npu", "openvino_device": "CPU"}, id="litert-compiled-npu-dispatch", marks=needs("openvino")),
    pytest.param({"type": "openvino"}, id="openvino", marks=needs("openvino")),
    pytest.param({"type": "openvino", "threads": 2}, id="openvino-2-threads", marks=needs("openvino")),
    pytest.param({"type": "onnxruntime"}, id="onnxruntime", marks=needs("onnxruntime")),
    pytest.param({"type": "onnxruntime", "threads": 2}, id="onnxruntime-2-threads", marks=needs("onnxruntime")),
])
def test_backend_agrees_with_the_reference(bundle, reference, settings):
    scores, scale = golden_scores(bundle, settings)
    assert_agrees(scores, reference, scale, bundle)


def test_each_backend_reports_the_tensors_the_manifest_promises(bundle):
    """Names may differ between runtimes; shape, dtype and quantization may not."""
    manifest = bundle.manifest
    for name in [n for n in ("litert", "litert-compiled", "openvino", "onnxruntime") if n in available_backends()]:
        backend = open_backend(bundle.root, manifest.files, BACKEND_SETTINGS[name]())
        (inp,), (out,) = backend.inputs, backend.outputs
        for real, claimed in ((inp, manifest.input), (out, manifest.output)):
            assert (real.shape, real.dtype, real.zero_point) == (tuple(claimed.shape), claimed.dtype, claimed.zero_point), name
            assert real.scale == pytest.approx(claimed.scale, rel=1e-6), name
        assert backend.device
        backend.close()


def test_builtin_kernels_round_differently_from_xnnpack_but_agree_on_top1(bundle, reference):
    """TFLite's builtin int8 kernels round differently from XNNPACK's: on one golden image a score moves
    7 steps (the top-1 does not). So builtin kernels are compared with litert's builtin kernels too."""
    builtin, scale = golden_scores(bundle, {"type": "litert", "kernels": "builtin"})
    assert (np.argmax(builtin, axis=1) == np.argmax(reference, axis=1)).all()
    print(f"builtin vs XNNPACK: at most {np.max(np.abs(builtin - reference)) / scale:.1f} steps")


@pytest.mark.skipif(not TFLITE_PYTHON.exists(), reason="make test builds .venv-tflite, where tflite-runtime lives (it needs numpy<2)")
def test_tflite_runtime_agrees_with_litert(bundle, reference, tmp_path):
    """tflite-runtime 2.14's XNNPACK takes no int8 op, so it runs the builtin kernels: it gives exactly what
    litert's builtin kernels give, and the reference's top-1 on every golden image."""
    out = tmp_path / "scores.npy"
    program = (
        "import sys, numpy as np\n"
        "from agent.inference.tasks.mnist_digits import classify_digits\n"
        "from agent.bundles.bundle import open_bundle\n"
        "from agent.inference.backends import open_backend\n"
        "from agent.settings import DEV_SIGNING_KEYS, TfliteRuntimeSettings\n"
        "b = open_bundle(sys.argv[1], trusted_keys=list(DEV_SIGNING_KEYS))\n"
        "backend = open_backend(b.root, b.manifest.files, TfliteRuntimeSettings())\n"
        "np.save(sys.argv[2], classify_digits(backend.run, backend.inputs[0], backend.outputs[0], b.golden_x.astype(np.float32) / 255.0))\n"
        "print(backend.device)\n"
    )
    done = subprocess.run([str(TFLITE_PYTHON), "-c", program, str(SHIPPED_BUNDLE), str(out)], capture_output=True, text=True, timeout=120, cwd=REPO, env=agent_env())
    assert done.returncode == 0, done.stderr
    assert "builtin kernels" in done.stdout
    scores = np.load(out)
    builtin, scale = golden_scores(bundle, {"type": "litert", "kernels": "builtin"})
    assert (np.argmax(scores, axis=1) == np.argmax(reference, axis=1)).all()
    assert_agrees(scores, builtin, scale, bundle)


@pytest.mark.tflite_runtime
@pytest.mark.skipif("tflite-runtime" not in available_backends(), reason="tflite-runtime runs in .venv-tflite (make test-tflite)")
def test_tflite_runtime_passes_the_golden_gate_in_its_own_environment(bundle):
    assert available_backends()[0] == "tflite-runtime"  # what auto picks there
    backend = open_backend(bundle.root, bundle.manifest.files, validate_settings({"model": {"backend": "auto"}}).model.backend)
    assert backend.name == "tflite-runtime"
    scores = classify(backend, bundle.golden_x.astype(np.float32) / 255.0)
    assert np.mean(np.argmax(scores, axis=1) == bundle.golden_y) >= bundle.manifest.min_golden_accuracy


# ---- opening: which file, and one-line errors ---------------------------------------------------------------

@needs("onnxruntime")
def test_onnxruntime_needs_a_bundle_that_carries_model_onnx():
    previous = open_bundle(PREVIOUS_BUNDLE, trusted_keys=list(DEV_SIGNING_KEYS))
    with pytest.raises(ModelError, match="reads model.onnx, which this bundle does not carry") as caught:
        open_backend(previous.root, previous.manifest.files, BACKEND_SETTINGS["onnxruntime"]())
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("name", [n for n in ("litert", "litert-compiled", "openvino") if n in available_backends()])
def test_a_file_that_is_not_a_model_is_one_model_error(tmp_path, name):
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelError) as caught:
        open_backend(tmp_path, ["model.tflite"], BACKEND_SETTINGS[name]())
    assert "\n" not in str(caught.value) and "model.tflite" in str(caught.value)


@needs("onnxruntime")
def test_an_onnx_file_that_is_not_a_model_is_one_model_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match="not a loadable ONNX model") as caught:
        open_backend(tmp_path, ["model.onnx"], BACKEND_SETTINGS["onnxruntime"]())
    assert "\n" not in str(caught.value)


@needs("onnxruntime")
def test_an_unknown_onnx_provider_is_named(bundle):
    settings = validate_settings({"model": {"backend": {"type": "onnxruntime", "providers": ["TensorrtExecutionProvider"]}}}).model.backend
    with pytest.raises(ModelError, match="TensorrtExecutionProvider not in this ONNX Runtime build"):
        open_backend(bundle.root, bundle.manifest.files, settings)


@needs("openvino")
def test_an_openvino_device_this_machine_lacks_is_named(bundle):
    import openvino

    missing = next(d for d in ("NPU", "GPU", "HDDL") if d not in openvino.Core().available_devices)
    settings = validate_settings({"model": {"backend": {"type": "openvino", "device": missing}}}).model.backend
    with pytest.raises(ModelError, match=f"model.backend.device {missing}: OpenVINO cannot compile for it") as caught:
        open_backend(bundle.root, bundle.manifest.files, settings)
    assert "\n" not in str(caught.value)


# ---- external delegates -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noop_delegate(tmp_path_factory) -> Path:
    """tests/data/noop_delegate.c built into a real delegate plugin library with the system C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the test delegate (apt-get install gcc)")
    library = tmp_path_factory.mktemp("delegate") / "libnoop_delegate.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(REPO / "tests" / "data" / "noop_delegate.c")], check=True, timeout=60)
    return library


@pytest.mark.skipif(not HAS_LITERT, reason="ai-edge-litert runs in the main environment")
def test_a_delegate_library_is_loaded_with_its_options(bundle, reference, noop_delegate, tmp_path):
    marker = tmp_path / "prepared"
    settings = {"type": "litert", "delegate": {"library": str(noop_delegate), "options": {"touch": str(marker)}}}
    backend = open_backend(bundle.root, bundle.manifest.files, validate_settings({"model": {"backend": settings}}).model.backend)
    assert marker.read_text() == "prepared\n"  # the interpreter handed the graph to our library, with our option
    assert backend.device.startswith(f"delegate {noop_delegate}, the rest on CPU")
    scores = classify(backend, bundle.golden_x.astype(np.float32) / 255.0)
    assert_agrees(scores, reference, backend.outputs[0].scale, bundle)


@pytest.mark.skipif(not HAS_LITERT, reason="ai-edge-litert runs in the main environment")
@pytest.mark.parametrize("delegate, reason", [
    ({"library": "/nonexistent/libedgetpu.so.1"}, "cannot open shared object file"),
    ({"library": "libc.so.6"}, "not a TFLite delegate plugin"),
    ({"library": "NOOP", "options": {"refuse": "yes"}}, "no accelerator attached (refuse=yes)"),
])
def test_a_delegate_that_cannot_load_is_one_line(noop_delegate, delegate, reason, tmp_path):
    """In its own process: the runtime's half-made Delegate would print a traceback on stderr when collected."""
    delegate = {**delegate, "library": delegate["library"].replace("NOOP", str(noop_delegate))}
    program = (
        "import gc, json, sys\n"
        "from agent.errors import ModelError\n"
        "from agent.inference.backends import open_backend\n"
        "from agent.settings import validate_settings\n"
        "settings = validate_settings({'model': {'backend': {'type': 'litert', 'delegate': json.loads(sys.argv[1])}}}).model.backend\n"
        "try:\n"
        f"    open_backend({str(SHIPPED_BUNDLE)!r}, ['model.tflite'], settings)\n"
        "except ModelError as error:\n"
        "    print(error)\n"
        "gc.collect()\n"
    )
    done = subprocess.run([sys.executable, "-c", program, json.dumps(delegate)], capture_output=True, text=True, timeout=60, cwd=REPO, env=agent_env())
    assert done.returncode == 0 and done.stderr == "", done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and line.startswith(f"model.backend.delegate.library {delegate['library']}: cannot load the delegate") and reason in line


# ---- the registry and its settings --------------------------------------------------------------------------

def test_every_built_in_backend_has_its_settings():
    assert set(backend_names()) == set(BACKEND_SETTINGS) - {"auto"}


def test_backend_settings_accept_a_bare_name_and_its_options():
    assert validate_settings({"model": {"backend": "openvino"}}).model.backend.type == "openvino"
    chosen = validate_settings({"model": {"backend": {"type": "onnxruntime", "threads": 2}}}).model.backend
    assert (chosen.type, chosen.threads) == ("onnxruntime", 2)
    assert validate_settings({}).model.backend.type == "auto"


def test_environment_names_the_backend(monkeypatch):
    monkeypatch.setenv("EDGE_AGENT_MODEL__BACKEND", "litert")
    assert load_settings().model.backend.type == "litert"
    monkeypatch.delenv("EDGE_AGENT_MODEL__BACKEND")
    monkeypatch.setenv("EDGE_AGENT_MODEL__BACKEND__THREADS", "2")
    assert (load_settings().model.backend.type, load_settings().model.backend.threads) == ("auto", 2)


def test_a_file_names_the_backend_and_the_environment_its_threads(tmp_path, monkeypatch):
    config = tmp_path / "settings.yaml"
    config.write_text("model:\n  backend: openvino\n")
    monkeypatch.setenv("EDGE_AGENT_MODEL__BACKEND__THREADS", "2")
    backend = load_settings(config).model.backend
    assert (backend.type, backend.threads) == ("openvino", 2)


def test_changing_the_backend_type_drops_the_previous_backends_options():
    merged = deep_merge({"model": {"backend": {"type": "litert", "kernels": "builtin"}}}, {"model": {"backend": {"type": "openvino"}}})
    assert validate_settings(merged).model.backend.type == "openvino"


@pytest.mark.parametrize("backend, message", [
    ("litrt", "setting model.backend: unknown backend 'litrt'; choose one of auto, litert"),
    ({"type": "openvino", "kernels": "builtin"}, "setting model.backend.openvino.kernels: unknown setting"),
])
def test_backend_setting_mistakes_are_named(backend, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate_settings({"model": {"backend": backend}})


def test_num_threads_says_where_it_moved():
    with pytest.raises(ConfigError, match=r"model.num_threads moved into the backend: set model.backend.threads"):
        validate_settings({"model": {"num_threads": 2}})


def test_cli_backend_choices_come_from_the_registry():
    line = one_line_error(run_cli("run", "--backend", "nonesuch", "--max-frames", "1"), program="edge-agent run")
    assert all(needle in line for needle in ("--backend", "invalid choice", "'onnxruntime'", "'litert-compiled'")), line


def test_a_plugin_backend_is_found_through_its_entry_point(tmp_path):
    """A package of its own (here a distribution folder on PYTHONPATH) adds a backend with its settings."""
    (tmp_path / "echo_backend.py").write_text(
        "import numpy as np\n"
        "from pydantic import BaseModel\n"
        "from agent.inference.backends import Backend, TensorSpec\n"
        "class EchoSettings(BaseModel):\n"
        "    gain: int = 1\n"
        "class EchoBackend(Backend):\n"
        "    name = 'echo'\n"
        "    settings_type = EchoSettings\n"
        "    def __init__(self, model_path, settings):\n"
        "        self.gain = settings.gain\n"
        "        self.inputs = self.outputs = [TensorSpec('x', (1,), 'float32', 0.0, 0)]\n"
        "        self.device = f'echo x{self.gain} of {model_path.name}'\n"
        "    def run(self, inputs):\n"
        "        return [np.asarray(inputs[0]) * self.gain]\n"
    )
    info = tmp_path / "edge_agent_echo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-agent-echo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[edge_agent.backends]\necho = echo_backend:EchoBackend\n")
    program = (
        "import numpy as np\n"
        "from agent.errors import ConfigError\n"
        "from agent.inference.backends import available_backends, open_backend\n"
        "from agent.settings import validate_settings\n"
        "assert 'echo' in available_backends()\n"
        "settings = validate_settings({'model': {'backend': {'type': 'echo', 'gain': 3}}}).model.backend\n"
        "backend = open_backend('.', ['model.tflite'], settings)\n"
        "print(backend.device, backend.run([np.array([2.0])])[0].tolist())\n"
        "try:\n"
        "    open_backend('.', ['model.tflite'], validate_settings({'model': {'backend': {'type': 'echo', 'gain': 'loud'}}}).model.backend)\n"
        "except ConfigError as error:\n"
        "    print(error)\n"
    )
    env = agent_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first == "echo x3 of model.tflite [6.0]"
    assert second.startswith("setting model.backend gain: Input should be a valid integer")


# ---- the bundles: 1.2.0 carries model.onnx and finder.tflite, 1.0.0 still loads --------------------------------------------------

def test_shipped_bundle_is_signed_by_the_current_development_key_and_carries_model_onnx_and_the_finder(bundle):
    assert bundle.signer == key_id(load_public_key(DEV_SIGNING_KEY))
    assert bundle.manifest.version == "1.2.0"
    assert {"model.tflite", "model.onnx", "finder.tflite"} <= set(bundle.manifest.files)


@pytest.mark.skipif(not HAS_LITERT, reason="ai-edge-litert runs in the main environment")
def test_previous_bundle_still_loads_with_the_previous_key_and_has_the_same_weights(bundle, reference):
    previous = open_bundle(PREVIOUS_BUNDLE, trusted_keys=list(DEV_SIGNING_KEYS))
    assert previous.manifest.version == "1.0.0"
    assert previous.signer == key_id(load_public_key(PREVIOUS_DEV_SIGNING_KEY))
    assert previous.manifest.files["model.tflite"] == bundle.manifest.files["model.tflite"]
    scores = classify(open_backend(previous.root, previous.manifest.files, BACKEND_SETTINGS["litert"]()), previous.golden_x.astype(np.float32) / 255.0)
    assert np.array_equal(scores, reference)


def test_shipped_model_onnx_is_what_the_committed_converter_makes(bundle):
    """Reproducible: the converter (train extra) gives the same bytes from the same model.tflite."""
    pytest.importorskip("tf2onnx", reason="tf2onnx is in the train extra (make bundle-onnx installs it)")
    from models.mnist.convert_onnx import tflite_to_onnx

    assert tflite_to_onnx(bundle.root / "model.tflite") == (bundle.root / "model.onnx").read_bytes()


# ---- the bench ------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_LITERT, reason="ai-edge-litert runs in the main environment")
def test_bench_compares_backends_writes_json_and_a_plot_and_picks_one(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is the plot extra (make test installs it)")
    names = ",".join(n for n in ("litert", "onnxruntime") if n in available_backends())
    config = tmp_path / "settings.yaml"
    config.write_text("thing_name: bench-box\n")
    result = run_cli(
        "bench", "--backends", names, "--threads", "1", "--json", tmp_path / "bench.json", "--plot", tmp_path / "bench.png",
        "--pick", "--config", config, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| backend | device | threads |") and len(table) == 2 + len(names.split(","))
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["backend"]: row for row in report["rows"]}
    assert set(rows) == set(names.split(","))
    for row in rows.values():
        assert row["agrees"] and row["same_top1"] == "300/300" and row["golden"] >= 0.97
        assert row["invoke_p50_us"] > 0 and row["frame_p50_ms"] > 0 and row["rss_mb"] > row["backend_mb"] > 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picked = yaml.safe_load(config.read_text())
    assert picked["thing_name"] == "bench-box" and picked["model"]["backend"]["type"] in rows
    assert load_settings(config).model.backend.type == picked["model"]["backend"]["type"]


def test_bench_pick_needs_a_settings_file():
    assert_one_line_error(run_cli("bench", "--backends", "litert", "--threads", "1", "--pick", timeout=300), "--pick", "--config")


def test_bench_names_an_unknown_backend():
    assert_one_line_error(run_cli("bench", "--backends", "litert,nonesuch"), "unknown backend 'nonesuch'")
