"""HttpMjpegSource against a real MJPEG server on 127.0.0.1, the multipart parser on real JPEG bytes, and
the pure backoff helpers."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mjpeg_server import MjpegServer
from test_sources_replay import Collect, wait_for

from daemon.sources.backoff import Backoff, log_worthy
from daemon.sources.base import redact_url
from daemon.sources.mjpeg import HttpMjpegSource, MultipartReader, StreamClosed, StreamProtocolError
from daemon.sources.replay import load_jpeg_frames


@pytest.fixture(scope="module")
def jpegs(vtest_path: Path) -> list[bytes]:
    return load_jpeg_frames(vtest_path, quality=60, limit=8)


def fast_source(url: str, sink: Collect, **kw: object) -> HttpMjpegSource:
    params: dict[str, object] = {"timeout_s": 2.0, "backoff_initial_s": 0.05, "backoff_max_s": 0.2}
    params.update(kw)
    return HttpMjpegSource("cam", url, sink, **params)  # type: ignore[arg-type]


# -- backoff (pure) ----------------------------------------------------------------------------------------------
def test_backoff_doubles_caps_and_resets() -> None:
    b = Backoff(initial_s=0.5, max_s=4.0, jitter=0.0)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.attempts == 6
    b.reset()
    assert b.attempts == 0 and b.next_delay() == 0.5


@pytest.mark.parametrize(("rnd", "expected"), [(0.0, [0.8, 1.6, 3.2, 6.4]), (1.0, [1.2, 2.4, 4.8, 8.0]),
                                               (0.5, [1.0, 2.0, 4.0, 8.0])])
def test_backoff_jitter_stays_within_bounds_and_cap(rnd: float, expected: list[float]) -> None:
    b = Backoff(initial_s=1.0, max_s=8.0, jitter=0.2, rng=lambda: rnd)
    assert [round(b.next_delay(), 6) for _ in range(4)] == expected


def test_backoff_survives_many_attempts() -> None:
    b = Backoff(initial_s=0.1, max_s=30.0)
    delays = [b.next_delay() for _ in range(5000)]
    assert max(delays) <= 30.0 and min(delays) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"initial_s": 0}, "initial_s"), ({"max_s": 0.1}, "max_s"), ({"factor": 0.5}, "factor"),
     ({"jitter": 1.0}, "jitter")],
)
def test_backoff_rejects_bad_parameters(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**kwargs)


def test_log_worthy_thins_to_powers_of_two() -> None:
    assert [n for n in range(1, 70) if log_worthy(n)] == [1, 2, 4, 8, 16, 32, 64]
    assert not log_worthy(0)


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("http://admin:s3cret@10.0.0.5/video.mjpg", "http://***@10.0.0.5/video.mjpg"),
        ("http://cam/snap.cgi?user=admin&pwd=s3cret&res=1", "http://cam/snap.cgi?user=admin&pwd=***&res=1"),
        ("rtsp://u:p@cam:554/Streaming/101?token=abc", "rtsp://***@cam:554/Streaming/101?token=***"),
        ("http://cam/video.mjpg", "http://cam/video.mjpg"),
    ],
)
def test_redact_url(url: str, safe: str) -> None:
    assert redact_url(url) == safe


# -- multipart parser ------------------------------------------------------------------------------------------
def _stream(parts: list[bytes], boundary: bytes = b"--frame", length: bool = True, between: bytes = b"\r\n") -> bytes:
    out = b""
    for p in parts:
        out += boundary + b"\r\nContent-Type: image/jpeg\r\n"
        if length:
            out += b"Content-Length: %d\r\n" % len(p)
        out += b"\r\n" + p + between
    return out + boundary + b"--\r\n"


@pytest.mark.parametrize(
    ("length", "between"),
    [(True, b"\r\n"), (False, b"\r\n"), (True, b"\n"), (False, b"\n"),
     (True, b"\r\n\r\nsome garbage \xff\xd8 bytes\r\nxx--frame is not a delimiter --frame-- either\r\n")],
)
def test_parser_reads_parts_with_and_without_length(jpegs: list[bytes], length: bool, between: bytes) -> None:
    raw = io.BytesIO(_stream(jpegs[:3], length=length, between=between))
    reader = MultipartReader(raw, "frame", max_part_bytes=10_000_000)
    got = [reader.next_part() for _ in range(3)]
    assert [p.data for p in got] == jpegs[:3]
    with pytest.raises(StreamClosed):
        reader.next_part()
    assert reader.bytes_in == len(raw.getvalue())


@pytest.mark.parametrize("length", [True, False])
def test_parser_drops_oversized_part_without_buffering_it(jpegs: list[bytes], length: bool) -> None:
    big = jpegs[1] * 40
    raw = io.BytesIO(_stream([jpegs[0], big, jpegs[2]], length=length))
    reader = MultipartReader(raw, "frame", max_part_bytes=len(jpegs[0]) * 3)
    parts = [reader.next_part() for _ in range(3)]
    assert parts[0].data == jpegs[0] and parts[2].data == jpegs[2]
    assert parts[1].data is None and parts[1].size == len(big)
    assert reader.buffered < len(big)


@pytest.mark.parametrize(("declared", "written"), [("--frame", b"--frame"), ("--frame", b"----frame"),
                                                   (None, b"--whatever")])
def test_parser_tolerates_camera_boundary_quirks(jpegs: list[bytes], declared: str | None, written: bytes) -> None:
    raw = io.BytesIO(_stream(jpegs[:2], boundary=written, length=False))
    reader = MultipartReader(raw, declared, max_part_bytes=10_000_000)
    assert [reader.next_part().data for _ in range(2)] == jpegs[:2]


def test_parser_gives_up_on_a_stream_without_boundaries() -> None:
    reader = MultipartReader(io.BytesIO(b"x" * 5000), "frame", max_part_bytes=1000)
    with pytest.raises(StreamProtocolError, match="no multipart boundary"):
        reader.next_part()


# -- against a real server -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts",
    [{}, {"content_length": False}, {"chunked": True}, {"chunked": True, "content_length": False},
     {"garbage": b"--not-the-boundary\r\n\xff\xd8junk\r\n"}, {"dashed_header": True, "content_length": False}],
    ids=["length", "no-length", "chunked", "chunked-no-length", "garbage", "dashed-boundary"],
)
def test_stream_frames_arrive_intact_and_in_order(jpegs: list[bytes], opts: dict[str, object]) -> None:
    sink = Collect()
    with MjpegServer(jpegs, fps=200, **opts) as cam:  # type: ignore[arg-type]
        src = fast_source(cam.url, sink)
        src.start()
        try:
            assert wait_for(lambda: len(sink.frames) >= 12)
            assert src.stats().state == "streaming"
        finally:
            assert src.stop(2)
    frames = sink.frames
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert [f.jpeg for f in frames[:12]] == (jpegs * 2)[:12]
    stats = src.stats()
    assert stats.errors == 0 and stats.reconnects == 0
    assert stats.bytes_in > sum(len(j) for j in jpegs)
    assert stats.last_frame_mono is not None


def test_oversized_frame_is_rejected_and_counted(jpegs: list[bytes]) -> None:
    big = jpegs[0] * 30
    sink = Collect()
    with MjpegServer([jpegs[1], big, jpegs[2]], fps=200, content_length=False) as cam:
        src = fast_source(cam.url, sink, max_frame_bytes=len(big) - 1)
        src.start()
        try:
            assert wait_for(lambda: len(sink.frames) >= 6)
        finally:
            assert src.stop(2)
    assert all(f.jpeg in (jpegs[1], jpegs[2]) for f in sink.frames)
    stats = src.stats()
    assert stats.errors >= 3 and stats.reconnects == 0
    assert "over max_frame_bytes" in stats.last_error


def test_dropped_connections_reconnect_and_keep_streaming(
    jpegs: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="daemon.sources")
    sink = Collect()
    with MjpegServer(jpegs, fps=200, drop_after=3) as cam:
        src = fast_source(cam.url, sink)
        src.start()
        try:
            assert wait_for(lambda: len(sink.frames) >= 10)
        finally:
            assert src.stop(2)
        assert cam.requests >= 4
    stats = src.stats()
    assert stats.reconnects >= 3
    assert len(caplog.records) <= 3, [r.getMessage() for r in caplog.records]  # a flapping camera is quiet
    assert [f.seq for f in sink.frames] == list(range(len(sink.frames)))


def test_401_without_credentials_then_ok_with_them(jpegs: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with MjpegServer(jpegs, fps=200, auth=("viewer", "hunter2")) as cam:
        sink = Collect()
        src = fast_source(cam.url, sink)
        src.start()
        try:
            assert wait_for(lambda: src.stats().errors >= 2)
            stats = src.stats()
            assert stats.state == "reconnecting" and "HTTP 401" in stats.last_error
            assert "no username configured" in stats.last_error and "Basic" in stats.last_error
            assert sink.frames == []
        finally:
            assert src.stop(2)
        wrong = fast_source(cam.url, Collect(), username="viewer", password="wrong-pw")  # noqa: S106 - test credentials
        wrong.start()
        assert wait_for(lambda: wrong.stats().errors >= 1)
        assert wrong.stop(2)
        assert "credentials rejected" in wrong.stats().last_error
        good_sink = Collect()
        good = fast_source(cam.url, good_sink, username="viewer", password="hunter2")  # noqa: S106 - test credentials
        good.start()
        try:
            assert wait_for(lambda: len(good_sink.frames) >= 3)
        finally:
            assert good.stop(2)
    assert "hunter2" not in caplog.text and "wrong-pw" not in caplog.text


def test_camera_that_disappears_and_comes_back(jpegs: list[bytes], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="daemon.sources")
    sink = Collect()
    cam = MjpegServer(jpegs, fps=100).start()
    src = fast_source(cam.url, sink)
    src.start()
    try:
        assert wait_for(lambda: len(sink.frames) >= 3)
        cam.stop()
        assert wait_for(lambda: src.stats().state == "reconnecting")
        time.sleep(1.0)  # several refused attempts at the 0.2 s cap
        down = src.stats()
        assert "connection refused" in down.last_error or "closed" in down.last_error
        assert down.reconnects >= 3
        n = len(sink.frames)
        cam.start()  # same port
        assert wait_for(lambda: len(sink.frames) >= n + 3)
        assert src.stats().state == "streaming"
    finally:
        assert src.stop(2)
        cam.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 <= len(warnings) <= 2 < down.errors, warnings  # one line per distinct message, not per attempt
    assert any("streaming again" in r.getMessage() for r in caplog.records)
    assert [f.seq for f in sink.frames] == list(range(len(sink.frames)))


def test_snapshot_camera_is_polled_at_max_fps(jpegs: list[bytes]) -> None:
    sink = Collect()
    with MjpegServer(jpegs, snapshot=True) as cam:
        src = fast_source(cam.url, sink, max_fps=20.0)
        src.start()
        time.sleep(1.0)
        assert src.stop(2)
        assert cam.requests == len(sink.frames)
    assert 12 <= len(sink.frames) <= 21
    assert [f.jpeg for f in sink.frames[:3]] == jpegs[:3]
    assert src.stats().reconnects == 0 and src.stats().errors == 0


def test_silent_camera_times_out_and_stop_is_prompt() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)  # never answers

    threading.Thread(target=accept, daemon=True).start()
    try:
        src = fast_source(f"http://127.0.0.1:{listener.getsockname()[1]}/x", Collect(), timeout_s=0.3)
        src.start()
        assert wait_for(lambda: src.stats().errors >= 1, timeout=5)
        assert "no data for 0.3 s" in src.stats().last_error
        src2 = fast_source(f"http://127.0.0.1:{listener.getsockname()[1]}/x", Collect(), timeout_s=30)
        src2.start()
        time.sleep(0.2)  # now blocked reading the response
        started = time.monotonic()
        assert src.stop(2) and src2.stop(2)
        assert time.monotonic() - started < 1.0
        assert src2.stats().errors == 0
    finally:
        listener.close()
        for c in accepted:
            c.close()


def test_constructor_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"camera 'cam'.*http"):
        HttpMjpegSource("cam", "ftp://x/y", Collect())
    with pytest.raises(ValueError, match="password needs a username"):
        HttpMjpegSource("cam", "http://x/y", Collect(), password="p")  # noqa: S106 - test credentials
    with pytest.raises(ValueError, match=r"\*\*\*@"):
        HttpMjpegSource("cam", "rtsp://u:secret@x/y", Collect())
