"""Logging as an operator sees it: the real CLI's stderr (time, level, logger, message; or JSON lines), the
INFO lines of a run, `--log-level` and `log.format`; and the two formatters on their own."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from conftest import agent_env, assert_one_line_error, one_line_error, run_cli

from agent.observe.logs import configure_logging
from agent.settings import LogSettings

TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|WARNING|ERROR) ([\w.]+): (.+)$")
SERVING = re.compile(r"serving model mnist-int8 version \S+ on backend (\S+) \((.+)\)")


def log_lines(stderr: str) -> list[re.Match]:
    """The log lines of stderr (the run's closing summary is a JSON object of its own, not a log line)."""
    return [m for line in stderr.splitlines() if (m := TEXT_LINE.match(line))]


def test_a_run_logs_what_it_serves_with_time_level_and_logger():
    done = run_cli("run", "--max-frames", "3")
    assert done.returncode == 0, done.stderr
    lines = log_lines(done.stderr)
    serving = [m for m in lines if m[2] == "INFO" and m[3] == "agent.app" and SERVING.fullmatch(m[4])]
    assert serving, done.stderr
    assert json.loads(done.stderr.splitlines()[-1])["frames"] == 3  # the summary stays the last line, as it was


def test_the_live_view_says_its_real_port_when_asked_for_any_free_one():
    done = run_cli("run", "--max-frames", "3", "--liveview", "--liveview-port", "0")
    assert done.returncode == 0, done.stderr
    [url] = [m[4] for m in log_lines(done.stderr) if m[2] == "INFO" and m[4].startswith("live view on ")]
    port = int(re.fullmatch(r"live view on http://127\.0\.0\.1:(\d+)/", url)[1])
    assert port > 0


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_log_level_warning_keeps_info_lines_out(how):
    if how == "flag":
        done = run_cli("run", "--max-frames", "3", "--log-level", "warning")
    else:
        done = run_cli("run", "--max-frames", "3", env=agent_env(EDGE_AGENT_LOG__LEVEL="warning"))
    assert done.returncode == 0, done.stderr
    assert not [m for m in log_lines(done.stderr) if m[2] == "INFO"], done.stderr


def test_json_format_is_one_object_per_line_with_the_events_own_fields():
    done = run_cli("run", "--max-frames", "3", env=agent_env(EDGE_AGENT_LOG__FORMAT="json"))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]  # every line is JSON
    logged = [r for r in records if "logger" in r]
    assert logged and all({"time", "level", "logger", "message"} <= set(r) for r in logged)
    [serving] = [r for r in logged if SERVING.fullmatch(r["message"])]
    assert serving["level"] == "INFO" and serving["model"] == "mnist-int8" and serving["backend"] == "litert" and serving["device"]
    assert TEXT_LINE.match(f"{serving['time']} INFO x: y")  # the same UTC timestamp as text lines


def test_a_bad_log_level_flag_is_one_line():
    line = one_line_error(run_cli("run", "--max-frames", "1", "--log-level", "loud"), program="edge-agent run")
    assert "--log-level" in line and "invalid choice" in line


@pytest.mark.parametrize("variable, setting", [("EDGE_AGENT_LOG__LEVEL", "log.level"), ("EDGE_AGENT_LOG__FORMAT", "log.format")])
def test_a_bad_log_setting_is_one_line(variable, setting):
    assert_one_line_error(run_cli("run", "--max-frames", "1", env=agent_env(**{variable: "loud"})), setting)


def emit(settings: LogSettings, level: int, message: str, *args, **kwargs) -> str:
    """What one record looks like once logging is configured with `settings` (the root logger is put back after)."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(settings, stream)
    try:
        logging.getLogger("agent.test").log(level, message, *args, **kwargs)
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
    return stream.getvalue()


def test_json_lines_carry_extra_fields_and_a_traceback_in_one_line():
    try:
        raise ValueError("bad value")
    except ValueError:
        line = emit(LogSettings(format="json"), logging.ERROR, "job %s failed", "j-1", extra={"job_id": "j-1"}, exc_info=True)
    assert line.count("\n") == 1
    record = json.loads(line)
    assert (record["level"], record["logger"], record["message"], record["job_id"]) == ("ERROR", "agent.test", "job j-1 failed", "j-1")
    assert "ValueError: bad value" in record["exception"]


def test_text_lines_and_the_level_threshold():
    settings = LogSettings(level="info")
    assert settings.level == "INFO"
    line = emit(settings, logging.INFO, "connected to %s", "x:8883")
    assert TEXT_LINE.match(line.strip()).groups()[1:] == ("INFO", "agent.test", "connected to x:8883")
    assert emit(settings, logging.DEBUG, "not shown") == ""
