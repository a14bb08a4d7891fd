"""HTTP endpoint on a real loopback socket: /healthz, /metrics, /preview MJPEG, index; hub; annotate."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from daemon.annotate import CACHED_COLOR, REGION_COLOR, Rect, annotate, class_color
from daemon.httpserver.server import BOUNDARY, HttpServer
from daemon.preview import PreviewHub
from daemon.stats.collector import SourceCounters, StatsCollector
from daemon.stats.model import NodeStats
from daemon.types import Detection, FrameResult, StageTimes


@dataclass(frozen=True)
class Cam:
    camera: str
    alive: bool
    last_frame_age_s: float | None


@dataclass(frozen=True)
class Report:
    ok: bool
    heartbeat_age_s: float
    cameras: tuple[Cam, ...]


class Health:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.fail = False

    def health(self) -> Report:
        if self.fail:
            raise RuntimeError("runtime gone")
        return self.report


class Stats:
    def __init__(self, snap: NodeStats | None = None) -> None:
        self.snap = snap

    def latest_stats(self) -> NodeStats | None:
        return self.snap


HEALTHY = Report(True, 0.25, (Cam("cam1", True, 0.1), Cam("cam2", False, None)))
PERSON = Detection(0, "person", 0.91, 100.0, 80.0, 220.0, 400.0)
CAR = Detection(2, "car", 0.55, 400.0, 300.0, 700.0, 520.0)


@pytest.fixture(scope="module")
def frames(vtest_path: Path) -> list[NDArray[np.uint8]]:
    cap = cv2.VideoCapture(str(vtest_path))
    out: list[NDArray[np.uint8]] = []
    while len(out) < 20:
        ok, img = cap.read()
        if not ok:
            break
        out.append(np.asarray(img, dtype=np.uint8))
    cap.release()
    assert len(out) == 20
    return out


def result(camera: str, seq: int, img: NDArray[np.uint8], cached: bool = False,
           dets: tuple[Detection, ...] = (PERSON, CAR)) -> FrameResult:
    h, w = img.shape[:2]
    return FrameResult(camera, seq, time.time(), time.monotonic(), w, h, dets, 50_000, img.nbytes, cached,
                       0.4 if cached else 0.0, StageTimes(0.001, 0.004, 0.030, 0.002))


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, Health, Stats, PreviewHub]]:
    health, stats, hub = Health(HEALTHY), Stats(), PreviewHub(max_fps=2.0)
    srv = HttpServer(health, stats, hub, host="127.0.0.1", port=0)
    srv.start()
    try:
        yield srv, health, stats, hub
    finally:
        srv.stop(3.0)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback test server
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


# -- /healthz ---------------------------------------------------------------------------------------------
def test_healthz(server: tuple[HttpServer, Health, Stats, PreviewHub]) -> None:
    srv, health, _, _ = server
    status, ctype, body = get(srv.url + "/healthz")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body) == {
        "ok": True, "heartbeat_age_s": 0.25,
        "cameras": [{"camera": "cam1", "alive": True, "last_frame_age_s": 0.1},
                    {"camera": "cam2", "alive": False, "last_frame_age_s": None}],
    }
    health.report = Report(False, 42.0, ())
    status, _, body = get(srv.url + "/healthz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "heartbeat_age_s": 42.0, "cameras": []}
    health.report = Report(False, float("inf"), (Cam("cam1", False, float("nan")),))
    status, _, body = get(srv.url + "/healthz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "heartbeat_age_s": None,
                                "cameras": [{"camera": "cam1", "alive": False, "last_frame_age_s": None}]}
    health.fail = True
    status, _, body = get(srv.url + "/healthz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "error": "health check failed: runtime gone"}


# -- /metrics ---------------------------------------------------------------------------------------------
def _real_snapshot(frames: list[NDArray[np.uint8]], gpu: bool) -> NodeStats:
    t = [100.0]
    collector = StatsCollector("cpu:onnxruntime", "no CUDA GPU", clock=lambda: t[0])
    collector.add_camera("cam1")
    for seq, img in enumerate(frames[:10]):
        r = result("cam1", seq, img)
        t[0] += 0.1
        collector.record_result(r, r.capture_mono + 0.05)
    t[0] = 101.0
    snap = collector.snapshot([SourceCounters("cam1", 12, 1, 1, 2, t[0] - 0.1)], liveness_s=5.0, wall=1.7e9)
    if not gpu:
        return snap
    from dataclasses import replace

    return replace(snap, pcie_tx_mb_s=12.5, pcie_rx_mb_s=480.0, gpu_mem_used_mb=2048.0)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_from_real_stats(server: tuple[HttpServer, Health, Stats, PreviewHub],
                                 frames: list[NDArray[np.uint8]]) -> None:
    srv, _, stats, _ = server
    status, ctype, body = get(srv.url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=")
    assert _samples(body.decode()) == {("deltayolo_stats_available", ()): 0.0}

    stats.snap = _real_snapshot(frames, gpu=False)
    m = _samples(get(srv.url + "/metrics")[2].decode())
    cam = (("camera", "cam1"),)
    assert m[("deltayolo_stats_available", ())] == 1.0
    assert m[("deltayolo_fps", ())] == pytest.approx(10.0)
    assert m[("deltayolo_latency_seconds", (("quantile", "0.5"),))] == pytest.approx(0.05, abs=1e-6)
    assert m[("deltayolo_camera_received_frames_total", cam)] == 12
    assert m[("deltayolo_camera_processed_frames_total", cam)] == 10
    assert m[("deltayolo_camera_dropped_frames_total", cam)] == 1
    assert m[("deltayolo_camera_reconnects_total", cam)] == 2
    assert m[("deltayolo_camera_up", cam)] == 1.0
    assert m[("deltayolo_camera_bytes_total", (("camera", "cam1"), ("stage", "in")))] == 500_000
    assert m[("deltayolo_bytes_per_second", (("stage", "in"),))] == pytest.approx(500_000)
    assert m[("deltayolo_stage_seconds", (("stage", "infer"),))] == pytest.approx(0.030)
    assert m[("deltayolo_backend_info", (("backend", "cpu:onnxruntime"), ("reason", "no CUDA GPU")))] == 1.0
    assert not any(name.startswith(("deltayolo_gpu", "deltayolo_pcie")) for name, _ in m)

    stats.snap = _real_snapshot(frames, gpu=True)
    m = _samples(get(srv.url + "/metrics")[2].decode())
    assert m[("deltayolo_gpu_memory_used_megabytes", ())] == 2048.0
    assert m[("deltayolo_pcie_rx_megabytes_per_second", ())] == 480.0
    assert m[("deltayolo_pcie_tx_megabytes_per_second", ())] == 12.5


def test_metrics_registry_is_per_instance(frames: list[NDArray[np.uint8]]) -> None:
    a = HttpServer(Health(HEALTHY), Stats(_real_snapshot(frames, gpu=False)), port=0)
    b = HttpServer(Health(HEALTHY), Stats(), port=0)
    assert a.registry is not b.registry
    assert b"deltayolo_fps" in generate_latest(a.registry)
    assert b"deltayolo_fps" not in generate_latest(b.registry)
    assert b"deltayolo_" not in generate_latest(REGISTRY)


# -- previews ---------------------------------------------------------------------------------------------
def _read_part(reader: http.client.HTTPResponse) -> bytes:
    """One multipart part: boundary, headers, JPEG."""
    line = reader.readline()
    while line in (b"\r\n", b""):
        if line == b"":
            raise EOFError("stream ended")
        line = reader.readline()
    assert line == f"--{BOUNDARY}\r\n".encode(), line
    headers = {}
    while (line := reader.readline()) != b"\r\n":
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    assert headers["content-type"] == "image/jpeg"
    return reader.read(int(headers["content-length"]))


def _decode(jpeg: bytes) -> NDArray[np.uint8]:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable JPEG"
    return np.asarray(img, dtype=np.uint8)


class Feeder:
    """Plays real frames into the hub as the pipeline would (~20 fps)."""

    def __init__(self, hub: PreviewHub, frames: list[NDArray[np.uint8]], camera: str = "cam1",
                 cached: bool = False) -> None:
        self.stop = threading.Event()
        self.taken = 0
        self._args = (hub, frames, camera, cached)
        self.thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def _run(self) -> None:
        hub, frames, camera, cached = self._args
        seq = 0
        while not self.stop.wait(0.05):
            img = frames[seq % len(frames)]
            self.taken += hub.offer(camera, img, result(camera, seq, img, cached))
            seq += 1

    def __enter__(self) -> Feeder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(2)


def _open_stream(srv: HttpServer, camera: str) -> http.client.HTTPResponse:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", f"/preview/{camera}")
    return conn.getresponse()


def _pixel_near(img: NDArray[np.uint8], color: tuple[int, int, int], tol: int = 40) -> int:
    diff = np.abs(img.astype(np.int16) - np.array(color, dtype=np.int16)).max(axis=2)
    return int((diff <= tol).sum())


def test_preview_stream_is_annotated_and_rate_limited(
    server: tuple[HttpServer, Health, Stats, PreviewHub], frames: list[NDArray[np.uint8]]
) -> None:
    srv, _, _, hub = server
    with Feeder(hub, frames):
        resp = _open_stream(srv, "cam1")
        assert resp.status == 200
        assert resp.getheader("Content-Type") == f"multipart/x-mixed-replace; boundary={BOUNDARY}"
        first = _read_part(resp)
        t0 = time.monotonic()
        parts = [_read_part(resp) for _ in range(3)]
        elapsed = time.monotonic() - t0
    assert hub.viewers("cam1") == 1
    resp.close()  # no new frames come now: the server must notice the hang-up by itself
    assert _wait(lambda: hub.viewers("cam1") == 0 and srv.active_streams == 0)
    assert elapsed >= 1.2, f"3 parts after the first took {elapsed:.2f} s: more than 2 fps"
    for jpeg in [first, *parts]:
        img = _decode(jpeg)
        assert img.shape == (576, 768, 3)
        # The person box edge (x=100, y 80..400) is drawn in the class color.
        edge = img[120:380, 99:102]
        assert _pixel_near(edge, class_color(0)) > 200
        assert _pixel_near(img[300:520, 699:702], class_color(2)) > 150


def test_index_snapshot_and_errors(server: tuple[HttpServer, Health, Stats, PreviewHub],
                                   frames: list[NDArray[np.uint8]]) -> None:
    srv, _, _, hub = server
    status, ctype, body = get(srv.url + "/")
    assert (status, ctype) == (200, "text/html; charset=utf-8")
    page = body.decode()
    assert '<a href="/preview/cam1"><img src="/snapshot/cam1"' in page
    assert '<a href="/preview/cam2"><img src="/snapshot/cam2"' in page
    assert '<a href="/metrics">' in page
    assert get(srv.url + "/snapshot/cam1")[0] == 503  # no frame yet
    assert hub.offer("cam1", frames[0], result("cam1", 1, frames[0]))
    status, ctype, body = get(srv.url + "/snapshot/cam1")
    assert (status, ctype) == (200, "image/jpeg")
    assert body[:2] == b"\xff\xd8"
    status, _, body = get(srv.url + "/preview/nosuchcam")
    assert status == 404 and b"no camera 'nosuchcam'" in body
    assert get(srv.url + "/nothing-here")[0] == 404


def test_previews_disabled() -> None:
    srv = HttpServer(Health(HEALTHY), Stats(), None, port=0)
    srv.start()
    try:
        status, _, body = get(srv.url + "/preview/cam1")
        assert status == 404 and b"previews are disabled" in body
        assert get(srv.url + "/healthz")[0] == 200
    finally:
        assert srv.stop(2)


def _wait(pred: object, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return True
        time.sleep(0.02)
    return False


def test_stream_limit_and_clean_stop(frames: list[NDArray[np.uint8]]) -> None:
    hub = PreviewHub(max_fps=2.0)
    srv = HttpServer(Health(HEALTHY), Stats(), hub, port=0, max_streams=1)
    srv.start()
    with Feeder(hub, frames):
        first = _open_stream(srv, "cam1")
        assert first.status == 200
        _read_part(first)
        second = _open_stream(srv, "cam1")
        assert second.status == 503
        second.close()
        t0 = time.monotonic()
        assert srv.stop(3.0)
        assert time.monotonic() - t0 < 2.0
        assert srv.active_streams == 0
        with pytest.raises((EOFError, ConnectionError, http.client.IncompleteRead)):
            for _ in range(10):
                _read_part(first)
        first.close()
    with pytest.raises(OSError):
        socket.create_connection(srv.address, timeout=1).close()


def test_removing_a_camera_ends_its_stream(server: tuple[HttpServer, Health, Stats, PreviewHub],
                                           frames: list[NDArray[np.uint8]]) -> None:
    srv, _, _, hub = server
    assert hub.offer("cam1", frames[0], result("cam1", 1, frames[0]))
    resp = _open_stream(srv, "cam1")
    _read_part(resp)
    hub.remove("cam1")
    with pytest.raises(EOFError):
        _read_part(resp)
    resp.close()
    assert _wait(lambda: srv.active_streams == 0)


def test_bind_conflict_names_the_address() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        srv = HttpServer(Health(HEALTHY), Stats(), port=port)
        with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{port}"):
            srv.start()
    with pytest.raises(ValueError, match="port"):
        HttpServer(Health(HEALTHY), Stats(), port=70000)


# -- PreviewHub -------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_hub_rate_limits_offers(frames: list[NDArray[np.uint8]]) -> None:
    clock = Clock()
    hub = PreviewHub(max_fps=2.0, idle_interval_s=5.0, clock=clock)
    img = frames[0]
    assert hub.offer("cam1", img, result("cam1", 1, img))
    clock.now += 1.0
    assert not hub.offer("cam1", img, result("cam1", 2, img))  # nobody watches: one per 5 s
    assert hub.offer("cam2", img, result("cam2", 1, img))  # per camera
    with hub.watch("cam1"):
        clock.now += 0.5
        assert hub.offer("cam1", img, result("cam1", 3, img))
        clock.now += 0.2
        assert not hub.offer("cam1", img, result("cam1", 4, img))
        clock.now += 0.3
        assert hub.offer("cam1", img, result("cam1", 5, img))
    latest = hub.latest("cam1")
    assert latest is not None and latest.seq == 5 and latest.detections == 2
    assert (latest.width, latest.height) == (768, 576)
    assert hub.cameras() == ("cam1", "cam2")


def test_hub_offer_is_cheap_when_not_due(frames: list[NDArray[np.uint8]]) -> None:
    hub = PreviewHub(max_fps=2.0)
    img = frames[0]
    r = result("cam1", 1, img)
    t0 = time.perf_counter()
    assert hub.offer("cam1", img, r)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(1000):
        hub.offer("cam1", img, r)
    skipped = (time.perf_counter() - t0) / 1000
    print(f"preview frame made in {made * 1000:.2f} ms; a skipped offer costs {skipped * 1e6:.1f} us")
    assert skipped < 50e-6
    assert made < 0.2


def test_hub_takes_jpeg_bytes_and_downsizes(bus_path: Path) -> None:
    jpeg = bus_path.read_bytes()
    src = _decode(jpeg)
    h, w = src.shape[:2]
    hub = PreviewHub(max_width=400)
    bus = Detection(5, "bus", 0.9, 20, 230, 800, 750)
    r = FrameResult("bus", 1, time.time(), time.monotonic(), w, h, (bus,), len(jpeg), 0)
    assert hub.offer("bus", jpeg, r)
    frame = hub.latest("bus")
    assert frame is not None
    assert frame.width == 400 and frame.height == round(h * 400 / w)
    assert _pixel_near(_decode(frame.jpeg), class_color(5)) > 300
    assert not hub.offer("bad", b"\xff\xd8 not a jpeg", FrameResult("bad", 1, 0.0, 0.0, 0, 0, (), 0, 0))
    assert hub.latest("bad") is None


def test_hub_close_and_remove_wake_viewers(frames: list[NDArray[np.uint8]]) -> None:
    hub = PreviewHub()
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(hub.wait_next("cam1", 0, 10.0)))
    t.start()
    time.sleep(0.05)
    assert hub.offer("cam1", frames[0], result("cam1", 7, frames[0]))
    t.join(2)
    assert len(got) == 1 and getattr(got[0], "seq", None) == 7
    assert hub.wait_next("cam1", 10**9, 0.05) is None
    hub.remove("cam1")
    assert hub.latest("cam1") is None
    t = threading.Thread(target=lambda: got.append(hub.wait_next("cam1", 0, 10.0)))
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    hub.close()
    t.join(2)
    assert time.monotonic() - t0 < 1.0 and got[-1] is None
    assert not hub.offer("cam1", frames[0], result("cam1", 8, frames[0]))


def test_hub_validates_settings() -> None:
    with pytest.raises(ValueError, match="max_fps"):
        PreviewHub(max_fps=0)
    with pytest.raises(ValueError, match="jpeg_quality"):
        PreviewHub(jpeg_quality=0)


# -- annotate ---------------------------------------------------------------------------------------------
def test_annotate_fresh_cached_and_regions(frames: list[NDArray[np.uint8]]) -> None:
    img = frames[0]
    before = img.copy()
    fresh = annotate(img, (PERSON,))
    cached = annotate(img, (PERSON,), cached=True)
    regions = annotate(img, (), regions=(Rect(300, 100, 500, 200),))
    assert np.array_equal(img, before)  # input untouched
    edge = (slice(120, 380), slice(100, 101))  # the person box's left edge
    assert _pixel_near(fresh[edge], class_color(0), tol=0) > 200
    assert _pixel_near(cached[edge], class_color(0), tol=0) == 0
    gray = _pixel_near(cached[edge], CACHED_COLOR, tol=0)
    assert 60 < gray < 200  # dashed: about half the edge
    assert _pixel_near(regions[100:201, 300:301], REGION_COLOR, tol=0) == 101


def test_annotate_clips_and_checks_input() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    out = annotate(img, (Detection(1, "bicycle", 0.5, -50, -20, 500, 300),), caption="cam1 #1 fresh")
    assert out.shape == img.shape
    assert _pixel_near(out[98:100, 50:150], class_color(1)) >= 90  # bottom edge clipped into the image
    with pytest.raises(ValueError, match="BGR uint8 HxWx3"):
        annotate(np.zeros((10, 10), np.uint8), ())
    small = annotate(np.zeros((576, 768, 3), np.uint8), (PERSON,), scale=0.5)
    assert small[100, 50].tolist() == list(class_color(0))  # x1=100, y=200 scaled by 0.5
