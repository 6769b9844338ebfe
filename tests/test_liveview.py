"""The live view as an operator sees it: a real headless Chromium opens the page of a real agent running
the sample video on the shipped model, and the picture it shows is checked pixel by pixel."""

from __future__ import annotations

import io
import threading
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from agent_process import get, metrics, running_agent, wait_for
from conftest import REPO, SAMPLE_VIDEO

from agent.app import build_pipeline
from agent.messages import SequenceCounter
from agent.observe.liveview import annotate
from agent.settings import Settings
from agent.transport.console import ConsoleTransport

FACE_BUNDLE = REPO / "models" / "face" / "bundle"
FACE_CLIP = REPO / "models" / "face" / "sample" / "faces.avi"
FACE_THRESHOLD = 0.6  # the clip's (make demo-face)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HEADER_ROWS = 30  # the model/fps/latency strip along the top of the frame


@pytest.fixture(scope="module")
def sample():
    """Every frame of the sample video and the shipped model's result on it, computed here, in-process."""
    pipeline = build_pipeline(Settings(source={"spec": str(SAMPLE_VIDEO)}, publish_empty=True), ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter("test"))
    frames = []
    while (frame := pipeline.source.read()) is not None:
        frames.append(frame)
    return frames, [pipeline.process(frame) for frame in frames]


def as_bgr(image: np.ndarray) -> np.ndarray:
    """A frame as the live view draws on it: the sources deliver grey unless colour is asked for."""
    return image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def green(image: np.ndarray) -> np.ndarray:
    """Where a BGR image is the annotation's green (JPEG-blurred), not paper, ink or board."""
    b, g, r = (image[..., i].astype(int) for i in range(3))
    return (g > 140) & (g - r > 60) & (g - b > 60)


def outline(box) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a box's four edges."""
    xs = np.arange(box.x, box.x + box.w)
    ys = np.arange(box.y, box.y + box.h)
    rows = np.concatenate([np.full(len(xs), box.y), np.full(len(xs), box.y + box.h - 1), ys, ys])
    cols = np.concatenate([xs, xs, np.full(len(ys), box.x), np.full(len(ys), box.x + box.w - 1)])
    return rows, cols


def assert_annotated(shown: np.ndarray, original: np.ndarray, result) -> None:
    """Each predicted box is drawn in green with a green label strip above it; the original has neither."""
    assert result.predictions, "the chosen frame should have predictions on it"
    for prediction in result.predictions:
        rows, cols = outline(prediction.box)
        assert green(shown[rows, cols]).mean() > 0.6, f"box of {prediction.label} at {prediction.box} not drawn"
        assert green(original[rows, cols]).mean() < 0.05
        if prediction.box.y >= HEADER_ROWS:
            strip = np.s_[prediction.box.y - 12 : prediction.box.y - 4, prediction.box.x : prediction.box.x + 8]
            assert green(shown[strip]).mean() > 0.5, f"label of {prediction.label} at {prediction.box} not drawn"
            assert green(original[strip]).mean() < 0.05


def best_match(shown: np.ndarray, frames) -> int:
    """The sample frame the picture shows: the one closest to it below the header strip."""
    below = shown[HEADER_ROWS:].astype(np.int16)
    differences = [np.abs(below - as_bgr(frame.image)[HEADER_ROWS:].astype(np.int16)).mean() for frame in frames]
    index = int(np.argmin(differences))
    assert differences[index] < 6, f"the picture matches no sample frame (closest differs by {differences[index]:.1f} grey levels)"
    return index


def test_annotate_draws_boxes_labels_and_header(sample):
    frames, results = sample
    index = next(i for i, r in enumerate(results) if len(r.predictions) >= 2)
    frame, result = frames[index], results[index]
    drawn = annotate(frame.image, result, result.model, fps=15.0, latency_ms=2.5)
    original = as_bgr(frame.image)
    assert drawn.shape == original.shape
    assert not np.shares_memory(drawn, frame.image), "the pipeline's frame must not be drawn on"
    assert_annotated(drawn, original, result)
    header = np.abs(drawn[:HEADER_ROWS].astype(int) - original[:HEADER_ROWS]).sum(axis=2) > 60
    assert header.mean() > 0.05, "model, fps and latency header not drawn"


def screenshot_stream(url: str, path: Path) -> tuple[list[float], bytes, str]:
    """Chromium opens the live view page: the stream image's natural and shown size and place, the image as
    the browser painted it (PNG), and the model the page names."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")  # the stream never finishes loading
            page.wait_for_function("() => document.getElementById('stream').naturalWidth > 0")
            page.wait_for_function("() => document.getElementById('model').textContent !== '?'")
            size = page.evaluate("() => { const i = document.getElementById('stream'); const r = i.getBoundingClientRect();"
                                 " return [i.naturalWidth, i.naturalHeight, r.width, r.height, r.x, r.y]; }")
            # The image as the browser painted it (the page's pixels; images snap to whole pixels).
            clip = {"x": round(size[4]), "y": round(size[5]), "width": size[2], "height": size[3]}
            png = page.screenshot(path=str(path), clip=clip)
            model_text = page.text_content("#model")
            page.wait_for_function("() => document.querySelectorAll('#predictions tr').length > 0")
        finally:
            browser.close()
    return size, png, model_text


def screenshot_with_predictions(url: str, folder: Path, frames, results) -> tuple[list[float], np.ndarray, str, int]:
    """Screenshots of the stream until one shows a frame with predictions (clips have scenes with none):
    its sizes, the picture, the model the page names, and which frame it is."""
    for attempt in range(10):
        size, png, model_text = screenshot_stream(url, folder / f"stream-{attempt}.png")
        shown = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        index = best_match(shown, frames)
        if results[index].predictions:
            return size, shown, model_text, index
    raise AssertionError("the stream never showed a frame with predictions")


def test_browser_sees_the_annotated_stream(sample, tmp_path):
    frames, results = sample
    with running_agent("--source", SAMPLE_VIDEO, "--loop", "--pace-fps", "15") as url:
        wait_for(lambda: get(url + "healthz")[0] == 200, "the agent to become healthy")
        size, shown, model_text, index = screenshot_with_predictions(url, tmp_path, frames, results)
    height, width = frames[0].image.shape[:2]
    assert size[:4] == [width, height, width, height]
    assert model_text == f"{results[0].model.name} {results[0].model.version}"
    assert shown.shape == (height, width, 3)
    assert_annotated(shown, as_bgr(frames[index].image), results[index])


def red(image: np.ndarray) -> np.ndarray:
    """Where a BGR image is the keypoints' red (JPEG-blurred)."""
    b, g, r = (image[..., i].astype(int) for i in range(3))
    return (r > 140) & (r - g > 60) & (r - b > 60)


def test_browser_sees_face_boxes_and_keypoints(tmp_path):
    """The face bundle on its clip, in colour: each face boxed, its eyes, nose, mouth and ears dotted."""
    settings = Settings(source={"spec": str(FACE_CLIP)}, model={"bundle": str(FACE_BUNDLE), "score_threshold": FACE_THRESHOLD}, publish_empty=True)
    pipeline = build_pipeline(settings, ConsoleTransport(io.StringIO(), io.StringIO()), SequenceCounter("test"))
    frames = []
    while (frame := pipeline.source.read()) is not None:
        frames.append(frame)
    results = [pipeline.process(frame) for frame in frames]
    assert frames[0].image.ndim == 3, "a colour model gets colour frames"
    with running_agent("--model", FACE_BUNDLE, "--source", FACE_CLIP, "--threshold", FACE_THRESHOLD, "--loop", "--pace-fps", "6") as url:
        _, shown, model_text, index = screenshot_with_predictions(url, tmp_path, frames, results)  # faces are in 4 of its 7 scenes
    assert model_text == "face-detection 1.0.0"
    assert_annotated(shown, frames[index].image, results[index])
    for face in results[index].predictions:
        assert len(face.keypoints) == 6
        for point in face.keypoints:
            around = shown[max(point.y - 2, 0) : point.y + 3, max(point.x - 2, 0) : point.x + 3]
            assert red(around).any(), f"keypoint {point.name} at ({point.x}, {point.y}) not drawn"
            assert not red(frames[index].image[max(point.y - 2, 0) : point.y + 3, max(point.x - 2, 0) : point.x + 3]).any()


def test_encodes_only_for_a_viewer(sample):
    with running_agent("--source", SAMPLE_VIDEO, "--loop", "--pace-fps", "15") as url:
        wait_for(lambda: metrics(url)["edge_agent_frames_processed_total"] >= 30, "frames to flow")
        unwatched = metrics(url)
        assert unwatched["edge_agent_liveview_viewers"] == 0
        assert unwatched["edge_agent_liveview_frames_encoded_total"] == 0, "encoded with nobody watching"

        parts = []
        stream = urllib.request.urlopen(url + "stream.mjpg", timeout=10)
        reader = threading.Thread(target=lambda: [parts.append(stream.read(4096)) for _ in range(200)], daemon=True)
        reader.start()
        watched = wait_for(lambda: (m := metrics(url))["edge_agent_liveview_frames_encoded_total"] >= 10 and m, "frames to be encoded for the viewer")
        assert watched["edge_agent_liveview_viewers"] == 1
        assert watched["edge_agent_liveview_frames_encoded_total"] <= watched["edge_agent_frames_processed_total"] - unwatched["edge_agent_frames_processed_total"] + 1
        stream.close()
        wait_for(lambda: metrics(url)["edge_agent_liveview_viewers"] == 0, "the server to notice the viewer left")
    body = b"".join(parts)
    assert body.startswith(b"--frame\r\nContent-Type: image/jpeg")
    first = body[body.index(b"\xff\xd8") : body.index(b"\xff\xd9") + 2]
    assert cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR).shape == as_bgr(sample[0][0].image).shape


def test_page_results_and_unknown_paths(sample):
    with running_agent("--source", SAMPLE_VIDEO, "--loop", "--pace-fps", "15") as url:
        status, page = get(url)
        assert status == 200 and b'<img id="stream" src="/stream.mjpg"' in page
        summary = wait_for(lambda: (s := __import__("json").loads(get(url + "results.json")[1]))["result"] and s, "a result")
        assert summary["model"]["version"] == sample[1][0].model.version
        assert summary["result"]["predictions"][0]["box"]["w"] > 0
        assert get(url + "nothing-here")[0] == 404
