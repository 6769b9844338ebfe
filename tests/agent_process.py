"""The agent as a real process with its live view on a free port, and small HTTP helpers to talk to it."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import IO, Callable, Iterator

from conftest import REPO, agent_env
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body), also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metrics(url: str) -> dict[str, float]:
    """Every sample of `/metrics`, parsed by prometheus-client's own parser: 'name{k="v"}' -> value."""
    _, body = get(url + "metrics")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0, every: float = 0.2):
    """Poll until `condition()` is truthy (and return it); fail naming `what` when it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class AgentProcess(str):
    """The live view's base URL, which can also tell what the agent wrote to stderr so far."""

    log: IO[str]

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


@contextmanager
def running_agent(*args: str, env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    """`edge-agent run --liveview ARGS` as a process; yields the live view's base URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "agent", "run", "--liveview", "--liveview-port", str(port), *map(str, args)]
    log = tempfile.TemporaryFile(mode="a+")  # a file, not a pipe (a chatty agent never blocks); appending, so reading it never moves where the agent writes
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True, cwd=REPO, env=agent_env(**(env or {})))
    url = AgentProcess(f"http://127.0.0.1:{port}/")
    url.log = log

    def answering() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the agent exited with {process.returncode}: {url.stderr()[-2000:]}")
        try:
            return get(url + "healthz", timeout=1)[0] in (200, 503)
        except OSError:
            return False

    try:
        wait_for(answering, "the live view to answer")
        yield url
    finally:
        stop_process(process)
        log.close()


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, as systemd or Greengrass stop the agent; SIGKILL if it is still there 15 s later."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
