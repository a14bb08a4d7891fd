"""ReplaySource against the real vtest.avi, short videos cut from it, and folders of real JPEGs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg

from daemon.sources.backoff import FpsCap
from daemon.sources.replay import ReplaySource, load_jpeg_frames
from daemon.types import EndOfStream, Frame


class Collect:
    """A sink that records what a source pushes."""

    def __init__(self) -> None:
        self.items: list[Frame | EndOfStream] = []
        self.lock = threading.Lock()

    def __call__(self, item: Frame | EndOfStream) -> None:
        with self.lock:
            self.items.append(item)

    @property
    def frames(self) -> list[Frame]:
        with self.lock:
            return [i for i in self.items if isinstance(i, Frame)]

    @property
    def ends(self) -> list[EndOfStream]:
        with self.lock:
            return [i for i in self.items if isinstance(i, EndOfStream)]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory, vtest_path: Path) -> Path:
    """The first 20 frames of vtest as an MJPG .avi (a real, short video file)."""
    out = tmp_path_factory.mktemp("video") / "short.avi"
    cap = cv2.VideoCapture(str(vtest_path))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"MJPG"), 20.0, (768, 576))
    for _ in range(20):
        ok, img = cap.read()
        assert ok
        writer.write(img)
    writer.release()
    cap.release()
    return out


def test_vtest_first_frames_are_real_jpegs_in_order(vtest_path: Path) -> None:
    sink = Collect()
    src = ReplaySource("cam1", vtest_path, sink, realtime=False)
    src.start()
    try:
        assert wait_for(lambda: len(sink.frames) >= 25)
        assert any(t.name == "capture:cam1" for t in threading.enumerate())
    finally:
        assert src.stop(5)
    frames = sink.frames
    assert [f.seq for f in frames] == list(range(len(frames)))
    for f in frames[:25]:
        assert f.camera == "cam1" and f.pixels is None and f.jpeg is not None
        assert f.jpeg[:2] == b"\xff\xd8"
        h, w, _, _ = simplejpeg.decode_jpeg_header(f.jpeg)
        assert (w, h) == (768, 576)
    assert frames[0].capture_time == pytest.approx(time.time(), abs=30)
    assert all(a.capture_mono <= b.capture_mono for a, b in itertools.pairwise(frames))
    stats = src.stats()
    assert stats.received >= 25 and stats.skipped_fps == 0 and stats.errors == 0
    assert stats.bytes_in == sum(len(f.jpeg or b"") for f in frames)
    assert stats.state == "ended" and not src.alive  # stopped by us: ended, but no EndOfStream pushed
    assert sink.ends == []


def test_video_end_pushes_end_of_stream_once(short_video: Path) -> None:
    sink = Collect()
    src = ReplaySource("cam", short_video, sink, realtime=False, jpeg_quality=70)
    src.start()
    assert wait_for(lambda: not src.alive)
    assert len(sink.frames) == 20
    assert sink.items[-1] == EndOfStream("cam", "end of short.avi")
    assert len(sink.ends) == 1
    assert src.stats().state == "ended"
    img = cv2.imdecode(np.frombuffer(sink.frames[5].jpeg or b"", np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (576, 768, 3)


def test_loop_wraps_to_the_first_frame(short_video: Path) -> None:
    sink = Collect()
    src = ReplaySource("cam", short_video, sink, realtime=False, loop=True)
    src.start()
    try:
        assert wait_for(lambda: len(sink.frames) >= 45)
    finally:
        assert src.stop(5)
    frames = sink.frames
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert frames[20].jpeg == frames[0].jpeg and frames[40].jpeg == frames[0].jpeg
    assert frames[21].jpeg != frames[0].jpeg
    assert sink.ends == []


def test_folder_replay_passes_bytes_as_stored(tmp_path: Path, bus_path: Path, zidane_path: Path) -> None:
    (tmp_path / "b_zidane.JPEG").write_bytes(zidane_path.read_bytes())
    (tmp_path / "a_bus.jpg").write_bytes(bus_path.read_bytes())
    (tmp_path / "c_empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a frame")
    sink = Collect()
    src = ReplaySource("folder", tmp_path, sink, realtime=False)
    src.start()
    assert wait_for(lambda: not src.alive)
    assert [f.jpeg for f in sink.frames] == [bus_path.read_bytes(), zidane_path.read_bytes(), b""]
    assert len(sink.ends) == 1 and sink.items[-1] is sink.ends[0]


def test_folder_loop_and_shared_preloaded_frames(tmp_path: Path, bus_path: Path, zidane_path: Path) -> None:
    for i, src_path in enumerate((bus_path, zidane_path, bus_path)):
        (tmp_path / f"{i}.jpg").write_bytes(src_path.read_bytes())
    frames = load_jpeg_frames(tmp_path, limit=2)
    assert frames == [bus_path.read_bytes(), zidane_path.read_bytes()]
    a, b = Collect(), Collect()
    sources = [ReplaySource(n, tmp_path, s, realtime=False, loop=True, frames=frames)
               for n, s in (("a", a), ("b", b))]
    for s in sources:
        s.start()
    try:
        assert wait_for(lambda: len(a.frames) >= 7 and len(b.frames) >= 7)
    finally:
        assert all(s.stop(5) for s in sources)
    assert [f.jpeg for f in a.frames[:6]] == [frames[0], frames[1]] * 3
    assert a.frames[0].jpeg is b.frames[0].jpeg  # one copy in memory, shared


def test_preload_encodes_once_and_replays(short_video: Path) -> None:
    sink = Collect()
    src = ReplaySource("pre", short_video, sink, realtime=False, preload=True, loop=True)
    src.start()
    try:
        assert wait_for(lambda: len(sink.frames) >= 60)
    finally:
        assert src.stop(5)
    f = sink.frames
    assert f[0].jpeg is f[20].jpeg and f[1].jpeg is f[41].jpeg  # replaying costs no encode


def test_realtime_paces_at_the_requested_fps(short_video: Path) -> None:
    sink = Collect()
    src = ReplaySource("rt", short_video, sink, fps=40.0, realtime=True)
    started = time.monotonic()
    src.start()
    assert wait_for(lambda: not src.alive)
    elapsed = time.monotonic() - started
    assert len(sink.frames) == 20
    assert 19 / 40 - 0.05 <= elapsed < 3.0
    monos = [f.capture_mono for f in sink.frames]
    assert monos[-1] - monos[0] == pytest.approx(19 / 40, abs=0.15)


def test_fps_cap_skips_and_counts(short_video: Path) -> None:
    sink = Collect()
    src = ReplaySource("cap", short_video, sink, fps=100.0, loop=True, max_fps=20.0)
    src.start()
    time.sleep(1.0)
    assert src.stop(5)
    stats = src.stats()
    forwarded = len(sink.frames)
    assert stats.received == forwarded + stats.skipped_fps
    assert 15 <= forwarded <= 24, (forwarded, stats)
    assert stats.skipped_fps >= 50


@pytest.mark.parametrize(
    ("times", "max_fps", "expected"),
    [
        ([i * 0.04 for i in range(25)], 10.0, 10),  # 25 fps capped at 10 gives 10, not 8
        ([i * 0.04 for i in range(25)], 100.0, 25),  # a cap above the rate drops nothing
        ([i * 0.001 for i in range(990)], 5.0, 5),  # as fast as possible: one per period
        ([0.0, 0.05, 5.0, 5.05, 5.1], 10.0, 3),  # after a pause the schedule restarts
    ],
)
def test_fps_cap_schedule(times: list[float], max_fps: float, expected: int) -> None:
    cap = FpsCap(max_fps)
    assert sum(cap.admit(t) for t in times) == expected


def test_stop_interrupts_a_slow_realtime_replay(short_video: Path) -> None:
    sink = Collect()
    src = ReplaySource("slow", short_video, sink, fps=0.2, realtime=True)
    src.start()
    assert wait_for(lambda: len(sink.frames) == 1)
    started = time.monotonic()
    assert src.stop(2)
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("kind", ["missing", "garbage", "empty_folder"])
def test_unreadable_input_fails_with_a_clear_message(tmp_path: Path, kind: str) -> None:
    if kind == "missing":
        path = tmp_path / "missing.avi"
    elif kind == "garbage":
        path = tmp_path / "garbage.avi"
        path.write_bytes(np.random.default_rng(0).bytes(10_000))
    else:
        path = tmp_path / "nothing"
        path.mkdir()
    sink = Collect()
    src = ReplaySource("door", path, sink, realtime=False, loop=True)
    src.start()
    assert wait_for(lambda: not src.alive)
    stats = src.stats()
    assert stats.state == "failed"
    assert "camera door" in stats.last_error and str(path) in stats.last_error
    assert stats.errors == 1
    assert sink.items == [EndOfStream("door", f"failed: {stats.last_error}")]


def test_bad_arguments_name_the_camera(vtest_path: Path) -> None:
    with pytest.raises(ValueError, match=r"camera 'x'.*jpeg_quality"):
        ReplaySource("x", vtest_path, Collect(), jpeg_quality=0)
    with pytest.raises(ValueError, match="max_fps"):
        ReplaySource("x", vtest_path, Collect(), max_fps=0)
    src = ReplaySource("x", vtest_path, Collect())
    src.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            src.start()
    finally:
        assert src.stop(5)
