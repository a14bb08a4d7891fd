"""AvSource (PyAV) on the real vtest.avi, on an H.264 mp4 written here with PyAV, and on dead RTSP cameras."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from test_sources_replay import Collect, wait_for

from daemon.sources.av import AvSource

N_FRAMES = 30
W, H = 160, 120
RATE = 50


def _pattern(i: int) -> np.ndarray:
    """Frame i: a flat colour that changes with i (BGR), plus a white square moving right."""
    img = np.empty((H, W, 3), np.uint8)
    img[:] = (40 + 5 * i, 200 - 4 * i, 90)
    img[40:60, 4 * i : 4 * i + 20] = 255
    return img


@pytest.fixture(scope="module")
def h264_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small mp4 encoded with PyAV: H.264 (libx264 / openh264) when its FFmpeg has one, else MPEG-4."""
    path = tmp_path_factory.mktemp("av") / "small.mp4"
    codec = next((c for c in ("libx264", "libopenh264", "mpeg4") if c in av.codecs_available), "mpeg4")
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=RATE)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.time_base = Fraction(1, RATE)
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(N_FRAMES):
            frame = av.VideoFrame.from_ndarray(_pattern(i), format="bgr24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _run_to_end(src: AvSource, timeout: float = 20.0) -> None:
    src.start()
    assert wait_for(lambda: not src.alive, timeout)


def test_vtest_frames_are_bgr_pixels_in_order(vtest_path: Path) -> None:
    sink = Collect()
    src = AvSource("cam", str(vtest_path), sink)
    src.start()
    try:
        assert wait_for(lambda: len(sink.frames) >= 15)
        assert any(t.name == "capture:cam" for t in threading.enumerate())
    finally:
        assert src.stop(5)
    frames = sink.frames
    assert [f.seq for f in frames] == list(range(len(frames)))
    for f in frames[:15]:
        assert f.jpeg is None and f.pixels is not None
        assert f.pixels.shape == (576, 768, 3) and f.pixels.dtype == np.uint8
    first, later = frames[0].pixels, frames[14].pixels
    assert first is not None and later is not None and not np.array_equal(first, later)  # people walk
    stats = src.stats()
    assert stats.received >= 15 and stats.errors == 0 and stats.bytes_in > 0


def test_h264_file_decodes_every_frame_then_ends(h264_mp4: Path) -> None:
    sink = Collect()
    src = AvSource("h264", str(h264_mp4), sink)
    _run_to_end(src)
    frames = sink.frames
    assert len(frames) == N_FRAMES
    assert len(sink.ends) == 1 and sink.items[-1] == sink.ends[0]
    assert sink.ends[0].reason == "end of small.mp4"
    for i in (0, 13, N_FRAMES - 1):
        px = frames[i].pixels
        assert px is not None and px.shape == (H, W, 3)
        expected = _pattern(i)
        assert np.abs(px[5:35, 100:150].astype(int) - expected[5:35, 100:150]).mean() < 6  # flat colour
        assert px[50, 4 * i + 10].min() > 200  # the white square is where it was drawn
    assert src.stats().state == "ended"


def test_file_loops_without_end_of_stream(h264_mp4: Path) -> None:
    sink = Collect()
    src = AvSource("loop", str(h264_mp4), sink, loop=True)
    src.start()
    try:
        assert wait_for(lambda: len(sink.frames) >= 2 * N_FRAMES + 5)
    finally:
        assert src.stop(5)
    frames = sink.frames
    assert [f.seq for f in frames] == list(range(len(frames)))
    first, again = frames[0].pixels, frames[N_FRAMES].pixels
    assert first is not None and again is not None and np.array_equal(first, again)
    assert sink.ends == []


def test_realtime_file_is_paced_at_its_fps(h264_mp4: Path) -> None:
    sink = Collect()
    src = AvSource("rt", str(h264_mp4), sink, realtime=True)
    started = time.monotonic()
    _run_to_end(src)
    elapsed = time.monotonic() - started
    assert len(sink.frames) == N_FRAMES
    span = sink.frames[-1].capture_mono - sink.frames[0].capture_mono
    assert span == pytest.approx((N_FRAMES - 1) / RATE, abs=0.15)
    assert elapsed >= (N_FRAMES - 1) / RATE - 0.05


def test_fps_cap_skips_before_converting(h264_mp4: Path) -> None:
    sink = Collect()
    src = AvSource("cap", str(h264_mp4), sink, realtime=True, max_fps=10.0)
    _run_to_end(src)
    stats = src.stats()
    assert stats.received == N_FRAMES
    assert stats.skipped_fps == N_FRAMES - len(sink.frames)
    assert 5 <= len(sink.frames) <= 8  # 0.6 s of video at 10 fps


@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_unreadable_file_fails_with_camera_and_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "clip.mp4"
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(3).bytes(20_000))
    sink = Collect()
    src = AvSource("yard", str(path), sink, loop=True)
    _run_to_end(src)
    stats = src.stats()
    assert stats.state == "failed"
    assert stats.last_error.startswith("camera yard: ") and str(path) in stats.last_error
    assert sink.items == [sink.ends[0]] and sink.ends[0].reason.startswith("failed: camera yard")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung camera)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock.getsockname()[1]
    sock.close()


def test_refused_rtsp_reconnects_with_backoff_and_hides_credentials(free_port: int) -> None:
    src = AvSource("gate", f"rtsp://admin:topsecret@127.0.0.1:{free_port}/stream1", Collect(),
                   timeout_s=1.0, backoff_initial_s=0.05, backoff_max_s=0.2)
    src.start()
    try:
        assert wait_for(lambda: src.stats().reconnects >= 2, timeout=10)
        stats = src.stats()
        assert stats.state == "reconnecting" and src.alive
        assert "topsecret" not in stats.last_error and "admin" not in stats.last_error
        assert f"rtsp://***@127.0.0.1:{free_port}/stream1" in stats.last_error
    finally:
        started = time.monotonic()
        assert src.stop(3)
    assert time.monotonic() - started < 1.5


def test_hung_rtsp_camera_times_out_instead_of_hanging(silent_listener: int) -> None:
    src = AvSource("dock", f"rtsp://127.0.0.1:{silent_listener}/live", Collect(),
                   timeout_s=0.5, backoff_initial_s=0.05, backoff_max_s=0.1)
    src.start()
    try:
        assert wait_for(lambda: src.stats().errors >= 2, timeout=10)
        assert src.stats().state == "reconnecting"
    finally:
        assert src.stop(3)


def test_rtsp_gets_tcp_and_a_socket_timeout_by_default() -> None:
    src = AvSource("x", "rtsp://cam/1", Collect(), timeout_s=2.5)
    assert src.options == {"rtsp_transport": "tcp", "timeout": "2500000"}
    own = AvSource("x", "rtsp://cam/1", Collect(), options={"rtsp_transport": "udp"})
    assert own.options["rtsp_transport"] == "udp" and "timeout" in own.options
    assert AvSource("x", "/some/file.mp4", Collect()).options == {}
