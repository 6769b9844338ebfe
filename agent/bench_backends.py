"""`edge-agent bench --backends all`: every installed backend, side by side, on the active bundle.

Each backend (at each thread count it has) is measured in its own process, so its memory and the
libraries it loads count for it alone; a backend installed in another environment (tflite-runtime, which
needs numpy<2) is measured with that environment's Python (`--python tflite-runtime=.venv-tflite/bin/python`).
Per backend:

- load: load_model (bundle checked, model opened on the backend, task built), ms; invoke: the first golden
  invoke's inputs in, outputs out, p50/p99 in us;
- frame: the configured source's decoded frames through the task and this backend (what the agent does
  per frame: prepare, invokes, predictions), ms;
- golden: the task's golden-set figure (accuracy for mnist-digits), and agreement with the reference
  backend (litert, one thread): the same top-1 of every golden invoke, and the largest difference of the
  dequantized outputs in output quantization steps (for a float output, the absolute difference); agrees =
  all the same top-1 and at most one step;
- rss: resident memory of the process with the model loaded and warm (before the bench decodes its
  frames), MB, and how much of it loading and running the model added.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError, ConfigError
from agent.settings import BACKEND_SETTINGS, Settings, read_settings_file, write_settings_file

REFERENCE = "litert"
WORKER_TIMEOUT_S = 600.0
STEP_TOLERANCE = 1.0  # outputs within one quantization step of the reference count as the same


# ---- one backend, in its own process ----------------------------------------------------------------

def _memory_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _percentiles_ms(samples: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(samples) * 1e3, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def measure(settings: Settings, scores_path: Path, max_frames: int = 300, rounds: int = 3, repeats: int = 2000) -> dict[str, Any]:
    """Measure settings.model.backend on settings.model.bundle (run inside the worker process).

    The golden outputs (every invoke of the task's golden check, dequantized, one row each) go to
    `scores_path` for the parent to compare with the reference backend's.
    """
    from agent.inference.evaluate import invoke_latency_us
    from agent.inference.model import load_model
    from agent.sources import open_source

    before_mb = _memory_mb("VmRSS")
    start = time.perf_counter()
    model = load_model(settings.model.bundle, settings.model, settings.tasks)
    load_ms = (time.perf_counter() - start) * 1e3
    backend = model.backend
    invokes: list[tuple[Sequence[np.ndarray], list[np.ndarray]]] = []

    def recording(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        outputs = backend.run(inputs)
        invokes.append((inputs, outputs))
        return outputs

    golden = model.task.golden(recording)
    np.save(scores_path, np.stack([np.concatenate([spec.dequantize(o).reshape(-1) for spec, o in zip(backend.outputs, outputs)]) for _, outputs in invokes]))
    invoke_p50, invoke_p99 = invoke_latency_us(backend.run, list(invokes[0][0]), repeats=repeats)
    rss_mb = _memory_mb("VmRSS")  # before the frames below are decoded and held (tens of MB the agent never holds)
    source = open_source(settings.source)
    frames = []
    while len(frames) < max_frames and (frame := source.read()) is not None:
        frames.append(frame.image)
    source.close()
    samples, predictions = [], 0
    for _ in range(rounds):
        for image in frames:
            start = time.perf_counter()
            predictions += len(model.infer(image, settings.model.score_threshold).predictions)
            samples.append(time.perf_counter() - start)
    frame_p50, frame_p99 = _percentiles_ms(samples)
    return {
        "model": f"{model.manifest.name} {model.manifest.version}",
        "device": backend.device,
        "load_ms": round(load_ms, 1),
        "invoke_p50_us": round(invoke_p50, 1),
        "invoke_p99_us": round(invoke_p99, 1),
        "frame_p50_ms": frame_p50,
        "frame_p99_ms": frame_p99,
        "frames": len(frames),
        "predictions_per_frame": round(predictions / max(1, len(samples)), 2),
        "golden_metric": golden.metric,
        "golden": round(golden.value, 4),
        "output_scale": backend.outputs[0].scale,
        "rss_mb": rss_mb,
        "backend_mb": round(rss_mb - before_mb, 1),
    }


def worker_main() -> int:
    """`python -m agent.bench_backends`: settings JSON on stdin, scores to argv[1], figures JSON on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        result = measure(Settings.model_validate(request["settings"]), Path(sys.argv[1]))
    except AgentError as error:
        result = {"error": str(error)}
    print(json.dumps(result))
    return 0


# ---- all backends, from the parent --------------------------------------------------------------------

def variants(settings: Settings, names: list[str], threads: list[int]) -> list[dict[str, Any]]:
    """The backend settings to measure: each backend at each thread count, litert-compiled also on its NPU
    dispatch (when openvino is installed). A backend configured in the settings keeps its other options."""
    configured = settings.model.backend
    found = []
    for name in names:
        base = configured.model_dump(mode="json") if configured.type == name else {"type": name}
        kind = BACKEND_SETTINGS.get(name)
        counts = threads if kind is not None and "threads" in kind.model_fields else [None]
        for count in counts:
            variant = {**base, "accelerator": "cpu"} if name == "litert-compiled" else dict(base)
            found.append(variant if count is None else {**variant, "threads": count})
        if name == "litert-compiled" and _installed("openvino"):
            found.append({**base, "accelerator": "npu", "openvino_device": _intel_device()})
    return found


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _intel_device() -> str:
    """The Intel device LiteRT's NPU dispatch should target here: an NPU if there is one, else GPU, else CPU."""
    import openvino

    devices = openvino.Core().available_devices
    return next((d for d in ("NPU", "GPU") if d in devices), "CPU")


def _run_worker(python: str, settings: Settings, scores_path: Path) -> dict[str, Any]:
    request = json.dumps({"settings": settings.model_dump(mode="json")})
    try:
        done = subprocess.run(
            [python, "-m", "agent.bench_backends", str(scores_path)],
            input=request, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {WORKER_TIMEOUT_S:.0f} s"}
    except OSError as exc:
        return {"error": f"cannot run {python} ({exc.strerror})"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": f"the measuring process failed: {last}"}
    return json.loads(lines[-1])


def _label(variant: dict[str, Any]) -> str:
    extras = [str(value) for key, value in variant.items() if key not in ("type", "threads") and value not in (None, {}, [])]
    return variant["type"] + (f" ({', '.join(extras)})" if extras else "")


def compare_backends(settings: Settings, names: list[str], threads: list[int], pythons: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure every variant of the named backends, then how each agrees with the reference."""
    from agent.inference.backends import available_backends, backend_names

    pythons = pythons or {}
    unknown = [name for name in [*names, *pythons] if name not in backend_names()]
    if unknown:
        raise ConfigError(f"--backends/--python: unknown backend {unknown[0]!r}; choose from {', '.join(backend_names())}")
    installed = set(available_backends()) | set(pythons)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as scratch:
        scores: dict[int, np.ndarray] = {}
        for index, variant in enumerate(variants(settings, [n for n in names if n in installed], threads)):
            variant_settings = Settings.model_validate({**settings.model_dump(mode="json"), "model": {**settings.model.model_dump(mode="json"), "backend": variant}})
            scores_path = Path(scratch) / f"{index}.npy"
            result = _run_worker(pythons.get(variant["type"], sys.executable), variant_settings, scores_path)
            if "error" not in result:
                scores[len(rows)] = np.load(scores_path)
            rows.append({"backend": variant["type"], "variant": _label(variant), "threads": variant.get("threads"), "settings": variant, **result})
        _agreement(rows, scores)
    rows += [{"backend": name, "variant": name, "threads": None, "settings": {"type": name}, "error": "not installed here"} for name in names if name not in installed]
    return {
        "bundle": str(settings.model.bundle),
        "source": settings.source.spec,
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "reference": REFERENCE,
        "rows": rows,
    }


def _agreement(rows: list[dict[str, Any]], scores: dict[int, np.ndarray]) -> None:
    """Same top-1 as the reference (litert, fewest threads) on every golden image, and the largest gap in steps."""
    reference = next((i for i, row in enumerate(rows) if row["backend"] == REFERENCE and i in scores), None)
    for i, row in enumerate(rows):
        if i not in scores or reference is None:
            continue
        ours, theirs = scores[i], scores[reference]
        same = np.argmax(ours, axis=1) == np.argmax(theirs, axis=1)
        steps = float(np.max(np.abs(ours - theirs)) / row["output_scale"]) if row["output_scale"] else float(np.max(np.abs(ours - theirs)))
        row["same_top1"] = f"{int(same.sum())}/{len(same)}"
        row["max_steps"] = round(steps, 2)
        row["agrees"] = bool(same.all() and steps <= STEP_TOLERANCE + 1e-6)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


COLUMNS = (
    ("backend", "variant"), ("device", "device"), ("threads", "threads"), ("load ms", "load_ms"),
    ("invoke p50 us", "invoke_p50_us"), ("invoke p99 us", "invoke_p99_us"), ("frame p50 ms", "frame_p50_ms"),
    ("frame p99 ms", "frame_p99_ms"), ("golden", "golden"), ("same top-1", "same_top1"),
    ("max diff (steps)", "max_steps"), ("agrees", "agrees"), ("RSS MB", "rss_mb"), ("backend MB", "backend_mb"),
)


def format_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (a failed backend's row says why in its device column)."""
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        cells = []
        for _, key in COLUMNS:
            value = row.get(key)
            if key == "device" and "error" in row:
                value = row["error"]
            cells.append("" if value is None else ("yes" if value is True else "no" if value is False else str(value)))
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Bar charts of invoke p50 and per-frame p50 per backend variant (matplotlib, the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'edge-agent[plot]'") from None
    rows = [row for row in report["rows"] if "error" not in row]
    labels = [row["variant"] + (f"\n{row['threads']} thr." if row["threads"] else "") for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows)), 5), constrained_layout=True)
    for axis, key, title in ((axes[0], "invoke_p50_us", "invoke p50 (us)"), (axes[1], "frame_p50_ms", "per-frame cost p50 (ms)")):
        colours = ["tab:blue" if row.get("agrees", True) else "tab:red" for row in rows]
        axis.bar(range(len(rows)), [row[key] for row in rows], color=colours)
        axis.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
        axis.set_title(title)
    figure.suptitle(f"{rows[0]['model'] if rows else report['bundle']} on {report['machine']['cpu']} (red: disagrees with {report['reference']})", fontsize=9)
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise ConfigError(f"--plot {path}: cannot write it ({exc.strerror})") from None
    finally:
        plt.close(figure)


def fastest_agreeing(report: dict[str, Any]) -> dict[str, Any] | None:
    """The row with the lowest per-frame cost among those that agree with the reference."""
    agreeing = [row for row in report["rows"] if row.get("agrees")]
    return min(agreeing, key=lambda row: (row["frame_p50_ms"], row["invoke_p50_us"]), default=None)


def pick_into(report: dict[str, Any], config: Path) -> dict[str, Any]:
    """Write the fastest agreeing backend as model.backend into the settings file; returns what was written."""
    best = fastest_agreeing(report)
    if best is None:
        raise ConfigError("--pick: no backend agreed with the reference, so none was written")
    data = read_settings_file(config) if config.exists() else {}
    data.setdefault("model", {})["backend"] = best["settings"]
    write_settings_file(config, data)
    return best["settings"]


if __name__ == "__main__":
    raise SystemExit(worker_main())
