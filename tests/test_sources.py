"""Frame sources through real OpenCV on real video files."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
from conftest import SAMPLE_VIDEO

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


def read_all(source) -> list:
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    return frames


def corrupt_frame(video, out, which: int) -> None:
    """Overwrite the middle of the `which`-th JPEG frame of an MJPG .avi with noise."""
    data = bytearray(video.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i] == 0xFF and data[i + 1] == 0xD8 and data[i + 2] == 0xFF]
    start = starts[which]
    data[start + 600 : start + 5000] = np.random.default_rng(0).integers(0, 256, 4400, dtype=np.uint8).tobytes()
    out.write_bytes(bytes(data))


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
    corrupt_frame(SAMPLE_VIDEO, broken, total // 2)
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
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read()))
    reader.start()
    time.sleep(0.2)
    source.close()
    reader.join(timeout=5)
    assert result == [None]


def test_unopenable_stream_is_a_source_error():
    with pytest.raises(SourceError, match="cannot open"):
        open_source(SourceSettings(spec="rtsp://127.0.0.1:1/none", read_timeout_s=1))
