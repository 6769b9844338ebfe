"""See what the device sees: a small HTTP server inside the agent with the annotated live stream.

`/` is a page with the MJPEG stream (`/stream.mjpg`: every prediction (digit, face) boxed and labelled with its score, keypoints dotted,
the model version, fps and latency drawn on the frame), the latest result and the model in use
(`/results.json`, polled by the page); `/metrics` is Prometheus, `/healthz` is 200 or 503 with the reason.

It must not slow the pipeline: the pipeline thread only keeps a reference to the latest frame and result
(`LiveView.on_frame`); drawing and JPEG encoding happen on the HTTP threads, only while a viewer is
connected, at most `max_fps` times a second, once per frame however many viewers there are.
Off unless enabled, and bound to 127.0.0.1 unless told otherwise: there is no authentication.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Iterator

import cv2
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.errors import ConfigError
from agent.settings import LiveViewSettings

if TYPE_CHECKING:
    from agent.inference.pipeline import Pipeline
    from agent.messages import InferenceResult, ModelRef
    from agent.observe.metrics import Health, Metrics
    from agent.sources import Frame

log = logging.getLogger(__name__)

BOUNDARY = "frame"
BOX_COLOUR = (0, 255, 0)  # BGR green: stands out on paper and on a board
TEXT_COLOUR = (255, 255, 255)
KEYPOINT_COLOUR = (0, 0, 255)  # BGR red: a face's eyes, nose and mouth inside its green box
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Snapshot:
    """What the pipeline saw last: the frame, its result (None when nothing was found) and its latency."""

    frame: Frame
    result: InferenceResult | None
    latency_ms: float


def annotate(image: np.ndarray, result: InferenceResult | None, model: ModelRef, fps: float, latency_ms: float) -> np.ndarray:
    """A copy of `image` with each prediction boxed, labelled and its keypoints dotted, and the model, fps and
    latency on top."""
    canvas = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    scale = max(canvas.shape[0] / 480, 0.5)
    thickness = max(int(round(2 * scale)), 1)
    for prediction in result.predictions if result is not None else ():
        box = prediction.box
        if box is None:
            continue
        cv2.rectangle(canvas, (box.x, box.y), (box.x + box.w - 1, box.y + box.h - 1), BOX_COLOUR, thickness)
        for point in prediction.keypoints or ():
            cv2.circle(canvas, (point.x, point.y), thickness + 1, KEYPOINT_COLOUR, cv2.FILLED)
        _label(canvas, f"{prediction.label} {prediction.score:.2f}", (box.x, box.y), scale, BOX_COLOUR, (0, 0, 0))
    header = f"{model.name} {model.version}  {fps:.1f} fps  {latency_ms:.1f} ms"
    _label(canvas, header, (0, 0), scale, (0, 0, 0), TEXT_COLOUR, below=True)
    return canvas


def _label(canvas: np.ndarray, text: str, corner: tuple[int, int], scale: float, background, colour, below: bool = False) -> None:
    """Text on a filled strip, above the corner (a box's label) or below it (the header)."""
    font_scale, thickness = 0.5 * scale, max(int(round(scale)), 1)
    (width, height), baseline = cv2.getTextSize(text, FONT, font_scale, thickness)
    x, y = corner
    top = y if below else max(y - height - baseline - 4, 0)
    cv2.rectangle(canvas, (x, top), (x + width + 4, top + height + baseline + 4), background, cv2.FILLED)
    cv2.putText(canvas, text, (x + 2, top + height + 2), FONT, font_scale, colour, thickness, cv2.LINE_AA)


class LiveView:
    """A FrameObserver that keeps the latest snapshot, and the encoder the stream handlers share."""

    def __init__(self, pipeline: Pipeline, settings: LiveViewSettings):
        self._pipeline = pipeline
        self._settings = settings
        self._latest: Snapshot | None = None
        self._latest_result: InferenceResult | None = None
        self._encoded: tuple[Snapshot | None, bytes] = (None, b"")
        self._encode_lock = threading.Lock()
        self._rate = (time.monotonic(), 0, 0.0)  # (when, frames then, fps measured)
        self._viewers_lock = threading.Lock()
        self.viewers = 0
        self.frames_encoded = 0

    def on_frame(self, frame: Frame, result: InferenceResult | None, latency_ms: float) -> None:
        # Pipeline thread: store references only.
        self._latest = Snapshot(frame, result, latency_ms)
        if result is not None:
            self._latest_result = result

    def viewer_joined(self, delta: int) -> None:
        with self._viewers_lock:
            self.viewers += delta

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    def fps(self) -> float:
        """Frames per second through the pipeline, measured over the last second or so."""
        since, frames_then, fps = self._rate
        now, frames = time.monotonic(), self._pipeline.stats.frames
        if now - since >= 1.0:
            fps = (frames - frames_then) / (now - since)
            self._rate = (now, frames, fps)
        return fps

    def jpeg(self, snapshot: Snapshot) -> bytes:
        """The annotated JPEG of `snapshot`, encoded once however many viewers ask for it."""
        with self._encode_lock:
            encoded_from, data = self._encoded
            if encoded_from is not snapshot:
                model = snapshot.result.model if snapshot.result is not None else self._pipeline.slot.active.ref
                image = annotate(snapshot.frame.image, snapshot.result, model, self.fps(), snapshot.latency_ms)
                ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self._settings.jpeg_quality])
                data = buffer.tobytes() if ok else data
                self._encoded = (snapshot, data)
                self.frames_encoded += 1
            return data

    def summary(self, health: Health) -> dict:
        """What `/results.json` answers: the model in use, rates, health and the latest result."""
        ok, reason = health.check()
        snapshot, result = self._latest, self._latest_result
        return {
            "model": self._pipeline.slot.active.ref.model_dump(mode="json"),
            "frames": self._pipeline.stats.frames,
            "results": self._pipeline.stats.results,
            "fps": round(self.fps(), 2),
            "latency_ms": round(snapshot.latency_ms, 3) if snapshot else None,
            "viewers": self.viewers,
            "health": {"ok": ok, "reason": reason},
            "result": result.model_dump(mode="json", exclude_none=True) if result else None,
        }


class LiveViewServer:
    """The HTTP server, on its own threads. `start()` then `close()`; `url` says where it listens."""

    def __init__(self, pipeline: Pipeline, settings: LiveViewSettings, metrics: Metrics, health: Health):
        self.view = LiveView(pipeline, settings)
        self.settings = settings
        self.metrics = metrics
        self.health = health
        self.closing = threading.Event()
        try:
            self._http = _HTTPServer((settings.host, settings.port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"liveview: cannot listen on {settings.host}:{settings.port} ({exc.strerror}); "
                "choose a free port with --liveview-port or a local address for liveview.host"
            ) from None
        self._http.app = self
        metrics.registry.register(_LiveViewCollector(self.view))
        self._thread = threading.Thread(target=self._http.serve_forever, name="liveview", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> LiveViewServer:
        self._thread.start()
        log.info("live view on %s", self.url)
        return self

    def close(self) -> None:
        self.closing.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(timeout=5)


class _LiveViewCollector(Collector):
    """Viewers and encoded frames, so an operator (and a test) can see the stream costs nothing unwatched."""

    def __init__(self, view: LiveView):
        self._view = view

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("edge_agent_liveview_viewers", "Viewers connected to /stream.mjpg", value=self._view.viewers)
        yield CounterMetricFamily("edge_agent_liveview_frames_encoded", "Annotated frames encoded as JPEG", value=self._view.frames_encoded)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # an open stream never holds up shutdown
    app: LiveViewServer


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        app = self.server.app
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(200, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/stream.mjpg":
            self._stream(app)
        elif path == "/results.json":
            self._send(200, "application/json", json.dumps(app.view.summary(app.health)).encode())
        elif path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, app.metrics.exposition())
        elif path == "/healthz":
            ok, reason = app.health.check()
            self._send(200 if ok else 503, "application/json", json.dumps({"ok": ok, "reason": reason}).encode())
        else:
            self._send(404, "text/plain", b"not found: try / /stream.mjpg /results.json /metrics /healthz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, app: LiveViewServer) -> None:
        """New annotated frames as multipart JPEG parts until the viewer leaves, at most max_fps a second."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        view, period = app.view, 1.0 / app.settings.max_fps
        view.viewer_joined(+1)
        try:
            sent, next_at = None, time.monotonic()
            while not app.closing.is_set():
                snapshot = view.latest
                if snapshot is not None and snapshot is not sent:
                    data = view.jpeg(snapshot)
                    self.wfile.write(f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                    sent = snapshot
                next_at = max(next_at + period, time.monotonic())
                app.closing.wait(next_at - time.monotonic())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the viewer left
        finally:
            view.viewer_joined(-1)

    def log_message(self, format: str, *args) -> None:
        log.debug("live view %s: " + format, self.address_string(), *args)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-agent live view</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1rem; background: #111; color: #eee; }
 #stream { display: block; image-rendering: auto; }
 table { border-collapse: collapse; margin-top: .5rem; } td, th { padding: .1rem .6rem; text-align: left; }
 .bad { color: #f66; } .ok { color: #6f6; }
</style></head>
<body>
<h1>edge-agent live view</h1>
<p>Model <b id="model">?</b> &middot; <span id="fps">?</span> fps &middot; <span id="latency">?</span> ms per frame
 &middot; health <span id="health">?</span></p>
<img id="stream" src="/stream.mjpg" alt="annotated live stream">
<h2>Latest result</h2>
<p id="frame"></p>
<table><thead><tr><th>label</th><th>score</th><th>box (x, y, w, h)</th></tr></thead><tbody id="predictions"></tbody></table>
<script>
function cell(row, text) { const td = document.createElement("td"); td.textContent = text; row.appendChild(td); }
async function refresh() {
  try {
    const s = await (await fetch("/results.json", {cache: "no-store"})).json();
    document.getElementById("model").textContent = s.model.name + " " + s.model.version;
    document.getElementById("fps").textContent = s.fps.toFixed(1);
    document.getElementById("latency").textContent = s.latency_ms === null ? "-" : s.latency_ms.toFixed(1);
    const health = document.getElementById("health");
    health.textContent = s.health.ok ? "ok" : s.health.reason;
    health.className = s.health.ok ? "ok" : "bad";
    const body = document.getElementById("predictions");
    body.replaceChildren();
    if (s.result) {
      document.getElementById("frame").textContent = "frame " + s.result.frame + " of " + s.result.source + " at " + s.result.captured_at;
      for (const p of s.result.predictions) {
        const row = document.createElement("tr");
        cell(row, p.label); cell(row, p.score.toFixed(2));
        cell(row, p.box ? [p.box.x, p.box.y, p.box.w, p.box.h].join(", ") : "-");
        body.appendChild(row);
      }
    }
  } catch (e) { document.getElementById("health").textContent = "agent not answering"; }
}
refresh(); setInterval(refresh, 1000);
</script>
</body></html>
"""
