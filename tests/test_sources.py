"""Frame sources through real OpenCV: real video files and image folders, and an IP camera served over HTTP."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import cv2
import numpy as np
import pytest
from agent_process import free_port
from conftest import SAMPLE_VIDEO, agent_env, one_line_error, run_cli
from mjpeg_camera import MjpegCamera, camera  # noqa: F401 (camera: a fixture)

from agent.errors import SourceError
from agent.settings import SourceSettings
from agent.sources import (
    LiveSource,
    Pacer,
    VideoFileSource,
    open_source,
)


def frame_count(path) -> int:
    return int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT))


def read_while(source, action: Callable[[], None], timeout: float = 60):
    """What `source.read()` returns when `action()` happens while it waits; the read must end within `timeout`."""
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read()))
    reader.start()
    time.sleep(0.2)
    action()
    reader.join(timeout=timeout)
    assert not reader.is_alive(), "read() did not end"
    return result[0]


def read_all(source) -> list:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def corrupt_frames(video, out, which: list[int] | None = None, at: int = 600) -> None:
    """Overwrite 4400 bytes of the listed JPEG frames (default: every one) of an MJPG .avi with noise, from
    `at` bytes into each: 600 damages the image data, 0 its header too."""
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i] == 0xFF and data[i + 1] == 0xD8 and data[i + 2] == 0xFF]
    noise = np.random.default_rng(0).integers(0, 256, 4400, dtype=np.uint8).tobytes()
    for start in starts if which is None else [starts[i] for i in which]:
        data[start + at : start + at + 4400] = noise
    out.write_bytes(bytes(data))


def corrupt_images(folder, count: int = 3) -> None:
    for i in range(count):
        (folder / f"{i}.png").write_bytes(b"\x89PNG not really" * 10)


def ffmpeg_frames(path) -> list:
    """Every frame as FFmpeg decodes it to BGR: what the sources are compared with."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    frames = []
    while (decoded := capture.read())[0]:
        frames.append(decoded[1])
    return frames


def test_video_file_gives_every_frame_in_order_then_ends():
    frames = read_all(VideoFileSource(SAMPLE_VIDEO))
    assert [f.index for f in frames] == list(range(frame_count(SAMPLE_VIDEO)))
    assert frames[0].image.shape == (480, 640)
    assert frames[0].source == str(SAMPLE_VIDEO)


def test_mjpg_frames_decoded_straight_to_grey_are_the_frames_in_grey():
    """libjpeg's grey decode of each JPEG packet is FFmpeg's BGR frame converted to grey, to a level or two."""
    expected = [cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) for image in ffmpeg_frames(SAMPLE_VIDEO)]
    frames = read_all(VideoFileSource(SAMPLE_VIDEO))
    assert len(frames) == len(expected)
    for frame, image in zip(frames[::20], expected[::20]):
        difference = cv2.absdiff(frame.image, image)
        assert difference.max() <= 3 and difference.mean() < 1.5


def test_colour_frames_when_asked(tmp_path):
    expected = ffmpeg_frames(SAMPLE_VIDEO)[0]
    frame = VideoFileSource(SAMPLE_VIDEO, colour=True).read()
    assert frame.image.shape == (480, 640, 3)
    assert cv2.absdiff(frame.image, expected).mean() < 1.0
    cv2.imwrite(str(tmp_path / "a.png"), expected)
    assert open_source(SourceSettings(spec=str(tmp_path), colour=True)).read().image.shape == (480, 640, 3)
    assert open_source(SourceSettings(spec=str(tmp_path))).read().image.shape == (480, 640)


def test_a_video_of_another_codec_goes_through_ffmpeg_and_is_grey_too(tmp_path):
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 30, (640, 480))
    for image in ffmpeg_frames(SAMPLE_VIDEO)[:10]:
        writer.write(image)
    writer.release()
    expected = [cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) for image in ffmpeg_frames(clip)]
    frames = read_all(VideoFileSource(clip))
    assert len(frames) == len(expected) == 10
    assert all(np.array_equal(frame.image, image) for frame, image in zip(frames, expected))


def test_video_file_is_deterministic():
    first = VideoFileSource(SAMPLE_VIDEO).read().image
    again = VideoFileSource(SAMPLE_VIDEO).read().image
    assert np.array_equal(first, again)


def test_corrupt_frame_in_the_middle_is_skipped_and_counted(tmp_path):
    broken = tmp_path / "broken.avi"
    total = frame_count(SAMPLE_VIDEO)
    corrupt_frames(SAMPLE_VIDEO, broken, [total // 2])
    source = VideoFileSource(broken)
    frames = read_all(source)
    assert source.stats.corrupt == 1
    assert len(frames) == total - 1
    assert total // 2 not in [f.index for f in frames]
    assert frames[-1].index == total - 1


def test_loop_restarts_at_the_end():
    source = VideoFileSource(SAMPLE_VIDEO, loop=True)
    total = frame_count(SAMPLE_VIDEO)
    indices = [source.read().index for _ in range(total + 5)]
    assert indices[total:] == list(range(total, total + 5))
    source.close()
    assert source.read() is None


def test_image_folder_in_name_order_skipping_unreadable(tmp_path):
    capture = cv2.VideoCapture(str(SAMPLE_VIDEO))
    for name in ("b.png", "a.jpg", "c.png"):
        ok, image = capture.read()
        cv2.imwrite(str(tmp_path / name), image)
    (tmp_path / "d.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    source = open_source(SourceSettings(spec=str(tmp_path)))
    frames = read_all(source)
    assert [f.source.rsplit("/", 1)[1] for f in frames] == ["a.jpg", "b.png", "c.png"]
    assert source.stats.corrupt == 1


class FakeTime:
    """A clock that only moves when slept on, so pacing is checked exactly."""

    def __init__(self):
        self.now = 100.0
        self.slept = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_pacer_holds_a_file_to_camera_rate():
    time_ = FakeTime()
    pacer = Pacer(fps=50, clock=time_.clock, sleep=time_.sleep)
    for _ in range(11):
        pacer.wait()
    assert time_.slept == [0.02] * 10  # the first frame goes at once, then one every 20 ms


def test_pacer_catches_up_after_a_slow_frame():
    time_ = FakeTime()
    pacer = Pacer(fps=10, clock=time_.clock, sleep=time_.sleep)
    pacer.wait()
    time_.now += 0.25  # the model took 2.5 periods
    pacer.wait()  # late: goes at once
    pacer.wait()  # one period of backlog is kept, like a camera's one buffered frame: at once
    pacer.wait()  # back on the 100 ms grid
    assert time_.slept == [0.05]


def test_no_pacing_by_default():
    time_ = FakeTime()
    pacer = Pacer(fps=None, clock=time_.clock, sleep=time_.sleep)
    for _ in range(5):
        pacer.wait()
    assert time_.slept == []


def video_opener(path):
    return lambda: cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)


def test_live_source_keeps_only_the_newest_frame():
    """A consumer slower than the capture never sees a backlog: it skips to the newest frame, counting drops."""
    settings = SourceSettings(reconnect_initial_s=0.05, reconnect_max_s=0.1)
    source = LiveSource("test-stream", video_opener(SAMPLE_VIDEO), settings)
    indices = []
    for _ in range(5):
        frame = source.read()
        assert frame.image.shape == (480, 640)  # grey, as every source delivers unless colour is asked for
        indices.append(frame.index)
        time.sleep(0.1)  # a slow model
    source.close()
    assert indices == sorted(set(indices))
    assert max(np.diff(indices)) > 1
    assert source.stats.dropped > 0


def test_live_source_reopens_after_the_device_disappears():
    """The 'device' (a short video) ends; the capture thread reopens it with backoff and frames flow again."""
    settings = SourceSettings(reconnect_initial_s=0.05, reconnect_max_s=0.1)
    source = LiveSource("flaky", video_opener(SAMPLE_VIDEO), settings)
    total = frame_count(SAMPLE_VIDEO)
    deadline = time.monotonic() + 60
    while source.stats.reconnects == 0 and time.monotonic() < deadline:
        source.read()
    assert source.stats.reconnects >= 1
    assert source.read() is not None
    source.close()


def test_live_source_close_unblocks_a_waiting_read(tmp_path):
    still = tmp_path / "one.avi"
    writer = cv2.VideoWriter(str(still), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    writer.write(np.full((48, 64, 3), 255, np.uint8))
    writer.release()
    source = LiveSource("one-frame", video_opener(still), SourceSettings(reconnect_initial_s=5, reconnect_max_s=5))
    source.read()
    assert read_while(source, source.close) is None


def test_unopenable_stream_is_a_source_error():
    with pytest.raises(SourceError, match="cannot open"):
        open_source(SourceSettings(spec="rtsp://127.0.0.1:1/none", read_timeout_s=1))


# --- A source where nothing decodes: it says so, never spins -------------------------------------------------

@pytest.mark.parametrize("loop", [False, True])
def test_a_video_whose_every_frame_is_damaged_is_a_source_error_when_opened(tmp_path, loop):
    broken = tmp_path / "broken.avi"
    corrupt_frames(SAMPLE_VIDEO, broken)
    with pytest.raises(SourceError, match="broken.avi: no frame of it decodes"):
        VideoFileSource(broken, loop=loop)


@pytest.mark.parametrize("loop", [False, True])
def test_a_folder_of_corrupt_images_is_a_source_error_when_opened(tmp_path, loop):
    corrupt_images(tmp_path)
    with pytest.raises(SourceError, match=r"cannot decode any of its 3 images \(.*0\.png, .*1\.png, .*2\.png\)"):
        open_source(SourceSettings(spec=str(tmp_path), loop=loop))


def test_a_pass_that_decodes_nothing_ends_a_looping_source(tmp_path):
    """Images that break after start-up: the next pass finds nothing, and the loop ends instead of spinning."""
    image = cv2.VideoCapture(str(SAMPLE_VIDEO)).read()[1]
    cv2.imwrite(str(tmp_path / "a.png"), image)
    source = open_source(SourceSettings(spec=str(tmp_path), loop=True))
    assert source.read() is not None
    (tmp_path / "a.png").write_bytes(b"broken since")
    with pytest.raises(SourceError, match="cannot decode any of its 1 image"):
        source.read()
    assert source.stats.corrupt == 1


def test_an_empty_video_is_a_source_error(tmp_path):
    empty = tmp_path / "empty.avi"
    writer = cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 48))
    writer.release()
    if not cv2.VideoCapture(str(empty), cv2.CAP_FFMPEG).isOpened():
        pytest.skip("this FFmpeg does not open a video without frames")
    with pytest.raises(SourceError, match="no frame of it decodes"):
        VideoFileSource(empty, loop=True)


@pytest.mark.parametrize("kind", ["video", "folder"])
@pytest.mark.parametrize("loop", [[], ["--loop"]])
def test_run_on_a_source_where_nothing_decodes_says_so_and_exits_2(tmp_path, kind, loop):
    """Before: exit 0 with 0 frames, and with --loop 100% CPU forever, deaf to SIGTERM (the timeout fails it)."""
    if kind == "video":
        spec = tmp_path / "broken.avi"
        corrupt_frames(SAMPLE_VIDEO, spec, at=0)  # headers gone: OpenCV refuses each frame without libjpeg's stderr warnings
        needle = "no frame of it decodes"
    else:
        spec = tmp_path / "images"
        spec.mkdir()
        corrupt_images(spec)
        needle = "cannot decode any of its 3 images"
    line = one_line_error(run_cli("run", "--source", spec, *loop, timeout=60))
    assert str(spec) in line and needle in line


def test_skipped_frames_are_warned_about_once_and_counted_every_pass(tmp_path, caplog):
    broken = tmp_path / "broken.avi"
    total = frame_count(SAMPLE_VIDEO)
    corrupt_frames(SAMPLE_VIDEO, broken, [10, 11, 12])
    source = VideoFileSource(broken, loop=True)
    with caplog.at_level(logging.WARNING, logger="agent.sources.files"):
        frames = [source.read() for _ in range(2 * total)]
    assert all(frames) and source.stats.corrupt == 6  # both passes
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"source {broken}: skipped 3 frames (10-12) that OpenCV cannot decode"]


def test_skipped_images_are_named_in_a_warning(tmp_path, caplog):
    capture = cv2.VideoCapture(str(SAMPLE_VIDEO))
    cv2.imwrite(str(tmp_path / "a.png"), capture.read()[1])
    (tmp_path / "b.png").write_bytes(b"not a png")
    cv2.imwrite(str(tmp_path / "c.png"), capture.read()[1])
    source = open_source(SourceSettings(spec=str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="agent.sources.files"):
        assert len(read_all(source)) == 2
    assert [r.getMessage() for r in caplog.records] == [f"source {tmp_path}: skipped 1 image ({tmp_path / 'b.png'}) that OpenCV cannot decode"]


def test_a_stop_interrupts_a_paced_read():
    """A file paced at one frame per 100 s: interrupt() (what SIGTERM does) ends the wait for the next one."""
    source = VideoFileSource(SAMPLE_VIDEO, pace_fps=0.01)
    assert source.read() is not None  # the first frame goes at once
    assert read_while(source, source.interrupt) is None


# --- Live sources: late at start-up, lost and back, paced ------------------------------------------------------

def test_a_stream_that_comes_up_after_the_agent_is_waited_for():
    """A stream that boots after the device: before, `cannot open` at once; now retried at start-up."""
    camera = MjpegCamera()
    later = threading.Timer(1.5, camera.start)
    later.start()
    try:
        source = open_source(SourceSettings(spec=camera.url, reconnect_initial_s=0.1, reconnect_max_s=0.5), wait_s=60)
        assert source.read() is not None
        source.close()
    finally:
        later.cancel()
        camera.stop()


def test_a_stream_that_never_comes_up_is_a_source_error_after_the_wait():
    url = f"http://127.0.0.1:{free_port()}/stream.mjpg"
    with pytest.raises(SourceError, match=r"cannot open it \(\d+ attempts in 1 s, source.open_timeout_s\)"):
        open_source(SourceSettings(spec=url, reconnect_initial_s=0.1, reconnect_max_s=0.2), wait_s=1)


def test_run_gives_up_on_a_missing_stream_in_one_line():
    url = f"http://127.0.0.1:{free_port()}/stream.mjpg"
    result = run_cli("run", "--source", url, env=agent_env(EDGE_AGENT_SOURCE__OPEN_TIMEOUT_S="1"), timeout=60)
    line = one_line_error(result)
    assert url in line and "source.open_timeout_s" in line


def test_frames_flow_again_when_a_dropped_stream_comes_back(camera, caplog):
    """With the default settings. How soon is tests/benchmarks/bench_reconnect.py's figure (goal: within 2 s)."""
    source = open_source(SourceSettings(spec=camera.url))
    with caplog.at_level(logging.INFO, logger="agent.sources.live"):
        try:
            assert source.read() is not None
            camera.stop()
            deadline = time.monotonic() + 60
            while source.stats.reconnects < 3 and time.monotonic() < deadline:  # down for a few probes
                time.sleep(0.1)
            assert source.stats.reconnects >= 3
            assert read_while(source, camera.start) is not None
        finally:
            source.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"source {camera.url}: lost") for m in messages), messages
    reopened = [r for r in caplog.records if r.getMessage().startswith("source reopened")]
    assert len(reopened) == 1 and reopened[0].levelno == logging.INFO and camera.url in reopened[0].getMessage()


def test_pace_fps_limits_a_live_source(camera):
    """A 15 fps camera taken at 3 fps: the frames in between are dropped, not queued. Unpaced, a reader as fast
    as this one takes every frame (test_live_source_keeps_only_the_newest_frame drops only when slow)."""
    source = open_source(SourceSettings(spec=camera.url, pace_fps=3))
    try:
        indices = [source.read().index for _ in range(4)]
    finally:
        source.close()
    assert source.stats.dropped >= 4  # about 4 per paced read
    assert min(np.diff(indices)) > 1
