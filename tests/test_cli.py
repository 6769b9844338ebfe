"""Every bad input through the real CLI: one line on stderr naming what and how to fix, exit 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    SAMPLE_VIDEO,
    SHIPPED_BUNDLE,
    agent_env,
    assert_one_line_error,
    one_line_error,
    run_cli,
)

from agent.fleet.packing import pack


def unsigned_copy(tmp_path: Path, model_bytes: bytes) -> Path:
    """The shipped bundle with another model file, re-hashed (so only the model itself is wrong)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    (bundle / "manifest.sig").unlink()
    (bundle / "model.tflite").write_bytes(model_bytes)
    pack(bundle)
    return bundle


def test_missing_model(tmp_path):
    assert_one_line_error(run_cli("run", "--model", tmp_path / "nope", "--max-frames", "1"), str(tmp_path / "nope"))


def test_truncated_model(tmp_path):
    bundle = unsigned_copy(tmp_path, (SHIPPED_BUNDLE / "model.tflite").read_bytes()[:5000])
    assert_one_line_error(run_cli("run", "--model", bundle, "--allow-unsigned", "--max-frames", "1"), "model")


def test_model_that_is_not_tflite(tmp_path):
    bundle = unsigned_copy(tmp_path, b"this is not a flatbuffer" * 100)
    assert_one_line_error(run_cli("run", "--model", bundle, "--allow-unsigned", "--max-frames", "1"), "model")


def test_unsigned_model_refused_by_default(tmp_path):
    bundle = unsigned_copy(tmp_path, (SHIPPED_BUNDLE / "model.tflite").read_bytes())
    assert_one_line_error(run_cli("run", "--model", bundle, "--max-frames", "1"), "sign")


def test_missing_video(tmp_path):
    assert_one_line_error(run_cli("run", "--source", tmp_path / "none.avi"), "none.avi", "no such video file")


def test_unreadable_video(tmp_path):
    video = tmp_path / "garbage.avi"
    video.write_bytes(b"\x00\x01garbage" * 1000)
    assert_one_line_error(run_cli("run", "--source", video), "garbage.avi", "cannot decode")


def test_empty_folder(tmp_path):
    assert_one_line_error(run_cli("run", "--source", tmp_path), "folder has no images")


@pytest.mark.parametrize("spec, needle", [("camera:front", "camera:N"), ("camera:57", "cannot open")])
def test_bad_camera(spec, needle):
    no_retry = agent_env(EDGE_AGENT_SOURCE__OPEN_TIMEOUT_S="0")
    assert_one_line_error(run_cli("run", "--source", spec, "--max-frames", "1", env=no_retry), spec, needle)


def test_setting_of_wrong_type_from_flag():
    assert_one_line_error(run_cli("run", "--max-frames", "ten"), "max_frames", "'ten'")


def test_setting_of_wrong_type_from_environment():
    assert_one_line_error(run_cli("run", "--max-frames", "1", env=agent_env(EDGE_AGENT_MQTT__PORT="eighty")), "mqtt.port")


def test_unknown_flag_is_one_line():
    assert_one_line_error(run_cli("run", "--frobnicate"), "--frobnicate")


def test_bad_settings_file(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("source:\n  spek: camera:0\n")
    assert_one_line_error(run_cli("run", "--config", config), "source.spek", "unknown setting")


def test_infer_missing_and_undecodable_images(tmp_path):
    assert_one_line_error(run_cli("infer", tmp_path / "nope.png"), "nope.png")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert_one_line_error(run_cli("infer", not_image), "notes.png", "cannot decode")


def test_infer_prints_one_result_per_image(tmp_path):
    import cv2

    capture = cv2.VideoCapture(str(SAMPLE_VIDEO))
    paths = []
    for i in range(3):
        ok, frame = capture.read()
        assert ok
        paths.append(tmp_path / f"frame{i}.png")
        cv2.imwrite(str(paths[-1]), frame)
    result = run_cli("infer", *paths)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["source"] for line in lines] == [str(p) for p in paths]
    assert all(line["kind"] == "inference" for line in lines)


def test_run_prints_json_results_for_the_sample_video():
    result = run_cli("run", "--max-frames", "30")
    assert result.returncode == 0, result.stderr
    results = [json.loads(line) for line in result.stdout.splitlines()]
    assert results and all(r["kind"] == "inference" and r["predictions"] for r in results)
    sequences = [r["sequence"] for r in results]
    assert sequences == sorted(set(sequences))
    assert len({r["message_id"] for r in results}) == len(results)


def test_a_reader_that_goes_away_stops_the_agent_quietly():
    """`edge-agent run | head -1`: the agent stops with SIGPIPE's status and no traceback."""
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--loop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=agent_env(), cwd=REPO)
    assert json.loads(agent.stdout.readline())["kind"] == "inference"
    agent.stdout.close()
    _, stderr = agent.communicate(timeout=60)
    assert agent.returncode == 141, stderr
    assert b"Traceback" not in stderr and b"Broken pipe" not in stderr


def test_package_runs_without_the_repo_layout_only_when_given_a_model(tmp_path):
    """Outside a checkout there is no shipped default: the error says to pass --model."""
    result = run_cli("run", "--model", REPO / "missing-bundle", "--max-frames", "1")
    assert_one_line_error(result, "missing-bundle")


def test_model_whose_input_is_not_an_image(tmp_path):
    """A real, valid TFLite model with a vector input, honestly described by its manifest: still refused."""
    from agent.bundles.bundle import read_manifest
    from agent.fleet.packing import write_manifest
    from agent.inference.backends.litert import LiteRtBackend
    from agent.settings import LiteRtSettings

    bundle = unsigned_copy(tmp_path, (REPO / "tests" / "data" / "not-an-image.tflite").read_bytes())
    backend = LiteRtBackend(bundle / "model.tflite", LiteRtSettings())
    raw, _ = read_manifest(bundle, str(bundle))
    for name, spec in (("input", backend.inputs[0]), ("output", backend.outputs[0])):
        raw[name].update(shape=list(spec.shape), dtype=spec.dtype, scale=spec.scale, zero_point=spec.zero_point)
    raw.pop("files")
    np.savez(bundle / "golden.npz", x=np.zeros((4, 10), np.uint8), y=np.zeros(4, np.uint8))
    write_manifest(bundle, raw)
    assert_one_line_error(run_cli("run", "--model", bundle, "--allow-unsigned", "--max-frames", "1"), "not an image")


@pytest.mark.parametrize("variable", ["EDGE_AGENT_TRANSPRT=mqtt", "EDGE_AGENT_MQQT__PORT=1", "EDGE_AGENT_MQTT_PORT=eighty"])
def test_misspelt_environment_variable(variable):
    name, value = variable.split("=")
    assert_one_line_error(run_cli("run", "--max-frames", "1", env=agent_env(**{name: value})), name, "names no setting")


def test_settings_file_that_is_not_utf8(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_bytes("thing_name: caf\u00e9\n".encode("latin-1"))
    assert_one_line_error(run_cli("run", "--config", config), str(config), "not UTF-8")


def test_settings_file_with_a_yaml_error(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("source:\n  spec: camera:0\n loop: true\n")
    assert_one_line_error(run_cli("run", "--config", config), str(config), "line 3, column 2")


def test_topic_template_typo():
    env = agent_env(EDGE_AGENT_TOPICS__STATUS="{prefix}/{thng}/status")
    assert_one_line_error(run_cli("run", "--max-frames", "1", env=env), "topics.status", "{thng}")


def unusable_places(tmp_path: Path) -> list[Path]:
    """Folders nothing can be written into, even as root: one under a regular file, and one inside /proc."""
    regular = tmp_path / "a-file"
    regular.write_text("a file, not a folder")
    return [regular / "out", Path("/proc/edge-agent-test/out")]


@pytest.mark.parametrize("place", [0, 1])
def test_unusable_output_paths_are_one_line(tmp_path, place):
    """Before: a traceback from mkdir, open or zipfile."""
    folder = unusable_places(tmp_path)[place]
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    for program, args, option in (
        ("agent", ["schema", "--out", folder], "--out"),
        ("agent.fleet", ["model", "keygen", "--key", folder / "fleet.key"], "--key"),
        ("agent.fleet", ["model", "keygen", "--key", tmp_path / "fleet.key", "--public", folder / "fleet.pub"], "--public"),
        ("agent.fleet", ["model", "pack", bundle, "--zip", folder / "bundle.zip"], "--zip"),
    ):
        result = run_cli(*args, program=program)
        line = one_line_error(result, program="edge-fleet" if program == "agent.fleet" else "edge-agent")
        assert f"{option} {folder}" in line and "cannot write there" in line, line
    assert not (tmp_path / "fleet.key").exists(), "a private key without its public half is not left behind"


def test_output_folders_that_do_not_exist_yet_are_made(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(SHIPPED_BUNDLE, bundle)
    assert run_cli("schema", "--out", tmp_path / "new" / "schemas").returncode == 0
    assert run_cli("model", "pack", bundle, "--zip", tmp_path / "new" / "zips" / "b.zip", program="agent.fleet").returncode == 0
    assert (tmp_path / "new" / "schemas" / "status.schema.json").is_file() and (tmp_path / "new" / "zips" / "b.zip").is_file()


def test_run_warns_about_skipped_images_and_counts_them_in_its_summary(tmp_path):
    import cv2

    capture = cv2.VideoCapture(str(SAMPLE_VIDEO))
    for name in ("a.png", "c.png"):
        cv2.imwrite(str(tmp_path / name), capture.read()[1])
    (tmp_path / "b.png").write_bytes(b"not a png")
    result = run_cli("run", "--source", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert any("skipped 1 image" in line and str(tmp_path / "b.png") in line for line in lines), result.stderr
    summary = json.loads(lines[-1])
    assert summary["frames"] == 2 and summary["frames_corrupt"] == 1 and summary["frames_dropped"] == 0
