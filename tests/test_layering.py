"""The house rules of the import graph, checked for real: the contracts in pyproject.toml (import-linter),
and what the light entry points actually load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

HEAVY = ("cv2", "ai_edge_litert", "tflite_runtime", "prometheus_client", "openvino", "onnxruntime")


def test_import_contracts_are_kept():
    """No import cycles anywhere in agent/, arrows point down, the operator CLI and the settings stay light."""
    lint_imports = Path(sys.executable).parent / "lint-imports"  # import-linter's command, installed with the test extra
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def loaded_by(code: str) -> set[str]:
    """The heavy packages a fresh interpreter has loaded after running `code`."""
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_operator_cli_help_loads_no_device_code():
    assert loaded_by("from agent.fleet.cli import build_parser\nbuild_parser().format_help()") == set()


def test_settings_and_outbox_load_no_device_code():
    assert loaded_by("import agent.settings, agent.transport.outbox, agent.messages") == set()
