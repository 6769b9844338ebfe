"""Results per second through Greengrass IPC (against the test nucleus), beside the console transport.
Prints JSON; asserts nothing (not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_greengrass.py [--messages 3000] [--frames 480] [--seconds 10]

- transport: real inference results (from the shipped model on the sample video) handed to each
  transport as fast as it takes them; for the Greengrass transport, the clock stops when the nucleus
  has acknowledged the last one (outbox -> PublishToIoTCore -> nucleus). Measured with the outbox's
  rate limit lifted and with IoT Core's 100 publishes/s quota, which is what a device really gets, each
  with results batched (the default outbox.batch_max) and one per publish (batch_max 1).
- agent: the whole agent as a process, unpaced sample video, console vs greengrass (with the nucleus's
  environment; IoT Core's quota, then lifted): frames/s and results/s from process start to exit
  (including the outbox draining at close), and seconds from process start to the first result.
- paced_30fps: `edge-agent bench`'s figures (CPU % of one core, memory, start to first result) for the
  agent reading the sample video at a camera's 30 fps, console vs under the nucleus.
The test nucleus runs in this process (one Python thread per connection), so its own cost is included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import REPO, SAMPLE_VIDEO, agent_env  # noqa: E402
from ipc_server import IpcServer, merge_configuration  # noqa: E402

from agent.app import build_pipeline  # noqa: E402
from agent.bench import bench_paced, measure_process  # noqa: E402
from agent.messages import SequenceCounter, unbatch  # noqa: E402
from agent.settings import Settings  # noqa: E402
from agent.topics import Topics  # noqa: E402
from agent.transport.console import ConsoleTransport  # noqa: E402

THING = "bench-1"
RECIPE = json.loads((REPO / "deploy" / "greengrass" / "recipe.json").read_text())


def real_results(count: int) -> list:
    settings = Settings(source={"spec": str(SAMPLE_VIDEO), "loop": True})
    pipeline = build_pipeline(settings, ConsoleTransport(), SequenceCounter(THING))
    results = []
    while len(results) < count:
        result = pipeline.process(pipeline.source.read())
        if result is not None:
            results.append(result)
    pipeline.source.close()
    return results


def console_rate(results: list) -> float:
    with open(os.devnull, "w") as sink:
        transport = ConsoleTransport(out=sink, side=sink)
        start = time.perf_counter()
        for result in results:
            transport.publish(result)
        return len(results) / (time.perf_counter() - start)


class ResultCount:
    """True once the nucleus holds `expected` results on `topic`; each payload is unpacked once, however
    often the nucleus asks (it asks on every request, and this runs on its threads)."""

    def __init__(self, nucleus: IpcServer, topic: str, expected: int):
        self.nucleus, self.topic, self.expected = nucleus, topic, expected
        self.messages = self.results = 0

    def __call__(self) -> bool:
        published = self.nucleus.published_to(self.topic)
        self.results += sum(len(unbatch(message.payload)) for message in published[self.messages :])
        self.messages = len(published)
        return self.results >= self.expected


def greengrass_rate(results: list, workdir: Path, publishes_per_s: float, batch_max: int) -> dict:
    from agent.transport.greengrass import from_settings

    configuration = RECIPE["ComponentConfiguration"]["DefaultConfiguration"]
    with IpcServer(workdir / "ipc.socket", thing_name=THING, configuration=configuration) as nucleus:
        os.environ.update(nucleus.component_env())
        outbox = {"path": str(workdir / f"outbox-{publishes_per_s:g}-{batch_max}.sqlite3"), "max_publishes_per_s": publishes_per_s, "max_bytes_per_s": 1e12, "batch_max": batch_max}
        settings = Settings(thing_name=THING, transport="greengrass", outbox=outbox)
        transport = from_settings(settings, Topics.for_thing(settings.topics, THING))
        pipeline = build_pipeline(settings, transport, SequenceCounter(THING))
        transport.start(pipeline.status("online"))
        inference = f"edge/{THING}/inference"
        start = time.perf_counter()
        for result in results:
            transport.publish(result)
        nucleus.wait_for(ResultCount(nucleus, inference, len(results)), timeout=600)
        elapsed = time.perf_counter() - start
        publishes = len(nucleus.published_to(inference))
        pipeline.source.close()
        transport.close(pipeline.status("offline"))
    return {"results_per_s": round(len(results) / elapsed, 1), "results_per_publish": round(len(results) / publishes, 1)}


def agent_run(transport: str, frames: int, workdir: Path, publishes_per_s: float = 100.0) -> dict:
    """The agent as a process; frames/s and results/s over the whole run, and time to the first result."""
    flags = ["run", "--source", str(SAMPLE_VIDEO), "--loop", "--max-frames", str(frames), "--transport", transport]
    nucleus = None
    if transport == "greengrass":
        settings = {"source": {"spec": str(SAMPLE_VIDEO), "loop": True}, "max_frames": frames, "outbox": {"max_publishes_per_s": publishes_per_s}}
        configuration = merge_configuration(RECIPE["ComponentConfiguration"]["DefaultConfiguration"], settings)
        nucleus = IpcServer(workdir / "agent-ipc.socket", thing_name=THING, configuration=configuration).start()
        env = nucleus.component_env()
        flags += ["--thing-name", THING, "--state-dir", str(workdir)]  # as the recipe's Run script: state in {work:path}
    else:
        env = agent_env()
    start = time.perf_counter()
    stderr_file = (workdir / f"{transport}.stderr").open("w+")  # a file, not a pipe: the agent never blocks on it
    stdout = subprocess.PIPE if nucleus is None else subprocess.DEVNULL
    process = subprocess.Popen([sys.executable, "-m", "agent", *flags], cwd=workdir, env=env, stdout=stdout, stderr=stderr_file, text=True)
    first = None
    if nucleus is None:
        for line in process.stdout:
            first = first or time.perf_counter() - start
    else:
        try:
            nucleus.wait_for(lambda: nucleus.published_to(f"edge/{THING}/inference"), timeout=120)
        except TimeoutError:
            process.kill()
            process.wait()
            stderr_file.seek(0)
            raise SystemExit(f"no result reached the nucleus; the agent said: {stderr_file.read()[-2000:]}") from None
        first = time.perf_counter() - start
    process.communicate(timeout=600)
    stderr_file.seek(0)
    stderr = stderr_file.read()
    stderr_file.close()
    elapsed = time.perf_counter() - start
    summary = json.loads(stderr.strip().splitlines()[-1])
    if nucleus is not None:
        nucleus.stop()
    return {
        "frames_per_s": round(summary["frames"] / elapsed, 1),
        "results_per_s": round(summary["results"] / elapsed, 1),
        "first_result_s": round(first, 2),
        "wall_s": round(elapsed, 2),
        "exit": process.returncode,
    }


def greengrass_paced(seconds: float, workdir: Path, fps: float = 30.0) -> dict:
    """`edge-agent bench`'s paced figures (CPU, memory, first result) for the agent under the nucleus."""
    settings = {"source": {"spec": str(SAMPLE_VIDEO), "loop": True, "pace_fps": fps}}
    configuration = merge_configuration(RECIPE["ComponentConfiguration"]["DefaultConfiguration"], settings)
    with IpcServer(workdir / "paced-ipc.socket", thing_name=THING, configuration=configuration) as nucleus:
        command = [sys.executable, "-m", "agent", "run", "--transport", "greengrass", "--thing-name", THING, "--state-dir", str(workdir)]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=workdir, env=nucleus.component_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            nucleus.wait_for(lambda: nucleus.published_to(f"edge/{THING}/inference"), timeout=120)
            first_result_s = time.perf_counter() - start
            time.sleep(1.0)  # past start-up
            measured = measure_process(process.pid, seconds)
        finally:
            process.terminate()
            process.wait(timeout=30)
        count = ResultCount(nucleus, f"edge/{THING}/inference", expected=0)
        count()
    return {"fps": fps, **measured, "start_to_first_result_s": round(first_result_s, 3), "results_per_publish": round(count.results / count.messages, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--frames", type=int, default=480)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each paced 30 fps run is measured")
    args = parser.parse_args()
    results = real_results(args.messages)
    batch_max = Settings().outbox.batch_max
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        report = {
            "transport_results_per_s": {
                "console": round(console_rate(results)),
                "greengrass_ipc_unlimited": greengrass_rate(results, workdir, 1e9, batch_max),
                "greengrass_ipc_unlimited_unbatched": greengrass_rate(results, workdir, 1e9, 1),
                "greengrass_ipc_iot_core_quota": greengrass_rate(results[:2000], workdir, 100.0, batch_max),
                "greengrass_ipc_iot_core_quota_unbatched": greengrass_rate(results[:500], workdir, 100.0, 1),
            },
            "agent_process": {
                "console": agent_run("console", args.frames, workdir),
                "greengrass_iot_core_quota": agent_run("greengrass", args.frames, workdir),
                "greengrass_quota_lifted": agent_run("greengrass", args.frames, workdir, publishes_per_s=1e9),
            },
            "paced_30fps": {
                "console": bench_paced(Settings(source={"spec": str(SAMPLE_VIDEO)}), args.seconds),
                "greengrass": greengrass_paced(args.seconds, workdir),
            },
            "messages": args.messages,
            "payload_bytes_mean": round(sum(len(r.to_json_bytes()) for r in results) / len(results)),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
