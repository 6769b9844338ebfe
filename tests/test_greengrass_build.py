"""`make component` (deploy/greengrass/build.py): where it writes, what it says, and what it needs to run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO
from docs_blocks import scratch_checkout

GREENGRASS = Path("deploy/greengrass")
AGENT_BUILD, MODEL_BUILD = GREENGRASS / "greengrass-build", GREENGRASS / "model" / "greengrass-build"


def test_component_build_writes_each_component_where_gdk_publishes_it_and_prints_absolute_paths(tmp_path):
    checkout = scratch_checkout(tmp_path / "checkout")
    fleet_key = tmp_path / "fleet.pub"
    fleet_key.write_text("a fleet's public key\n")
    done = subprocess.run([sys.executable, GREENGRASS / "build.py", "--trusted-key", fleet_key], capture_output=True, text=True, timeout=600, cwd=checkout)
    assert done.returncode == 0, done.stderr
    printed = [Path(line) for line in done.stdout.splitlines()]
    assert printed and all(path.is_absolute() and path.is_file() for path in printed)
    agent = {path.relative_to(checkout / AGENT_BUILD).as_posix() for path in printed if path.is_relative_to(checkout / AGENT_BUILD)}
    model = {path.relative_to(checkout / MODEL_BUILD).as_posix() for path in printed if path.is_relative_to(checkout / MODEL_BUILD)}
    assert len(agent) + len(model) == len(printed)
    assert "recipes/com.example.EdgeAgent-0.1.0.json" in agent and "recipes/com.example.EdgeAgent.MnistModel-1.2.0.json" in model
    assert "artifacts/com.example.EdgeAgent.MnistModel/1.2.0/mnist-bundle.zip" in model
    assert (checkout / AGENT_BUILD / "artifacts/com.example.EdgeAgent/0.1.0/model-signing.pub").read_text() == "a fleet's public key\n"
    guide = (REPO / GREENGRASS / "README.md").read_text()  # says where to look, as the top-level README does
    assert f"{AGENT_BUILD}/" in guide and f"{MODEL_BUILD}/" in guide and "greengrass-build/" in (REPO / "README.md").read_text()


def test_by_default_the_agent_component_trusts_the_development_key_that_can_still_sign():
    spec = importlib.util.spec_from_file_location("greengrass_build", REPO / GREENGRASS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.TRUSTED_KEY == REPO / "models" / "keys" / "dev-signing-2026-12b.pub"


def test_gdk_builds_with_the_projects_venv():
    for folder in (REPO / GREENGRASS, REPO / GREENGRASS / "model"):
        ((_, component),) = json.loads((folder / "gdk-config.json").read_text())["component"].items()
        interpreter = component["build"]["custom_build_command"][0]
        assert os.path.normpath(folder / interpreter) == str(REPO / ".venv" / "bin" / "python"), interpreter


def test_the_model_build_without_the_projects_packages_says_it_needs_the_venv(tmp_path):
    """As gdk would run it with a bare python3: one line naming the fix, no traceback."""
    packages = tmp_path / "site-packages"
    packages.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("pydantic", "__editable__")) and entry.suffix != ".pth":
            (packages / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": str(packages)}
    done = subprocess.run([sys.executable, "-S", REPO / GREENGRASS / "build.py", "model", "--out", tmp_path / "out"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "needs the project's venv" in done.stderr
    assert not (tmp_path / "out").exists()


def test_under_greengrass_the_agent_keeps_its_state_in_the_components_work_folder():
    (manifest,) = json.loads((REPO / GREENGRASS / "recipe.json").read_text())["Manifests"]
    assert "--state-dir {work:path}" in manifest["Lifecycle"]["Run"]["Script"]
    configuration = json.loads((REPO / GREENGRASS / "recipe.json").read_text())["ComponentConfiguration"]["DefaultConfiguration"]
    assert configuration["state_dir"] is None  # null: the Run script's flag decides
    assert (configuration["outbox"]["path"], configuration["updates"]["store"]) == ("outbox.sqlite3", "models")  # inside it
