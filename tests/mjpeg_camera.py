"""An IP camera for tests and benchmarks: the sample video as multipart JPEG over HTTP, which OpenCV's FFmpeg
reads like a real camera's stream, and which a test can stop, start again on the same port, or freeze."""

from __future__ import annotations

import functools
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import cv2
import pytest
from agent_process import free_port
from conftest import SAMPLE_VIDEO


@functools.cache
def sample_jpegs() -> tuple[bytes, ...]:
    """Every frame of the sample video as a JPEG, encoded once per process."""
    capture = cv2.VideoCapture(str(SAMPLE_VIDEO))
    frames = []
    while (read := capture.read())[0]:
        frames.append(cv2.imencode(".jpg", read[1])[1].tobytes())
    capture.release()
    return tuple(frames)


class MjpegCamera:
    """An IP camera: the sample video as multipart JPEG over HTTP at `fps`, that a test can stop, start
    again on the same port, or freeze (connections stay open, no more bytes: a hung camera)."""

    def __init__(self, fps: float = 15.0):
        self.jpegs = sample_jpegs()
        self.fps = fps
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._server: ThreadingHTTPServer | None = None
        self._generation = 0
        self._frozen_generation = -1

    def start(self) -> MjpegCamera:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                generation = camera._generation
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                index = 0
                try:
                    while camera._server is server:
                        if generation <= camera._frozen_generation:
                            time.sleep(0.05)
                            continue
                        jpeg = camera.jpegs[index % len(camera.jpegs)]
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(jpeg), jpeg))
                        index += 1
                        time.sleep(1 / camera.fps)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def freeze(self) -> None:
        """Connections open now stop sending (and stay open); new connections are served normally."""
        self._frozen_generation = self._generation
        self._generation += 1

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


@pytest.fixture
def camera() -> Iterator[MjpegCamera]:
    """A camera streaming from the start of the test, stopped at its end."""
    camera = MjpegCamera().start()
    yield camera
    camera.stop()
