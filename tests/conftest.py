"""Shared fixtures: where the shipped model and sample video are, and running the real CLI as a process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = REPO / "models" / "mnist" / "bundle"
SAMPLE_VIDEO = REPO / "models" / "mnist" / "sample" / "sample.avi"
SAMPLE_TRUTH = REPO / "models" / "mnist" / "sample" / "truth.json"
MNIST = REPO / "models" / "mnist" / "data" / "mnist.npz"


def agent_env(**extra: str) -> dict[str, str]:
    """The environment for an agent process: ours, minus any EDGE_AGENT_* a developer has set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, program: str = "agent") -> subprocess.CompletedProcess:
    """`python -m agent ARGS` as a real process (the console script is a thin wrapper around it)."""
    return subprocess.run(
        [sys.executable, "-m", program, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or agent_env(),
        cwd=REPO,
    )


INFO_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z INFO ")  # agent.observe.logs' text format


def one_line_error(result: subprocess.CompletedProcess, program: str = "edge-agent") -> str:
    """The product's promise for bad input: exit 2 and exactly one stderr line, no traceback. Returns it.

    INFO log lines that came before it (what the agent was doing, e.g. waiting for a camera) are not
    part of the error; a warning or anything else is."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not INFO_LOG_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: "), result.stderr
    return lines[0]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """One line (see one_line_error) that names each of `needles`."""
    line = one_line_error(result)
    for needle in needles:
        assert needle in line, line


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path, monkeypatch) -> Path:
    """Each test's agents keep their outbox and model store apart (state_dir defaults to $XDG_STATE_HOME/edge-agent)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    return tmp_path / "xdg-state" / "edge-agent"


@pytest.fixture(scope="session")
def shipped_bundle() -> Path:
    return SHIPPED_BUNDLE


@pytest.fixture(scope="session")
def sample_video() -> Path:
    return SAMPLE_VIDEO
