"""/preview in a real headless Chromium (Debian package `chromium`): a screenshot shows the annotated stream.

The frame is the real bus photo with the real YOLOv8n's boxes (onnxruntime CPU). An MJPEG stream never
finishes loading, so Chromium's --timeout stops the load and the screenshot shows what is on screen then.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from daemon.annotate import class_color
from daemon.httpserver.server import HttpServer
from daemon.preview import PreviewHub
from daemon.stats.model import NodeStats
from daemon.types import Detection, FrameResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (apt-get install -y chromium)")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1000,800")


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


class Provider:
    def health(self) -> Report:
        return Report(True, 0.1, (Cam("cam", True, 0.1),))

    def latest_stats(self) -> NodeStats | None:
        return None


def yolo_detections(model_path: Path, img: NDArray[np.uint8]) -> tuple[Detection, ...]:
    """Real YOLOv8n boxes: letterbox to 640, onnxruntime CPU, class-wise NMS, back to source pixels."""
    import onnxruntime as ort

    h, w = img.shape[:2]
    scale = 640 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    px, py = (640 - nw) // 2, (640 - nh) // 2
    canvas = np.full((640, 640, 3), 114, np.uint8)
    canvas[py:py + nh, px:px + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    x = canvas[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    # Ultralytics metadata: names = "{0: 'person', 1: 'bicycle', ...}"
    names = ast.literal_eval(sess.get_modelmeta().custom_metadata_map["names"])
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0][0].T  # [8400, 84]
    cls = pred[:, 4:].argmax(1)
    conf = pred[np.arange(len(pred)), 4 + cls]
    keep = conf > 0.4
    xywh, cls, conf = pred[keep, :4], cls[keep], conf[keep]
    x1y1 = (xywh[:, :2] - xywh[:, 2:] / 2 - (px, py)) / scale
    x2y2 = (xywh[:, :2] + xywh[:, 2:] / 2 - (px, py)) / scale
    boxes = [[float(a), float(b), float(c - a), float(d - b)]
             for (a, b), (c, d) in zip(x1y1, x2y2, strict=True)]
    idx = cv2.dnn.NMSBoxesBatched(boxes, conf.tolist(), cls.tolist(), 0.4, 0.5)
    return tuple(
        Detection(int(cls[i]), str(names[int(cls[i])]), float(conf[i]), float(x1y1[i][0]), float(x1y1[i][1]),
                  float(x2y2[i][0]), float(x2y2[i][1]))
        for i in np.asarray(idx).reshape(-1)
    )


@pytest.fixture(scope="module")
def bus_frame(bus_path: Path, model_path: Path) -> tuple[NDArray[np.uint8], tuple[Detection, ...]]:
    img = cv2.imread(str(bus_path), cv2.IMREAD_COLOR)
    assert img is not None
    frame = np.asarray(img, dtype=np.uint8)
    dets = yolo_detections(model_path, frame)
    classes = {d.class_name for d in dets}
    assert {"person", "bus"} <= classes, dets
    return frame, dets


@pytest.fixture
def live_server(bus_frame: tuple[NDArray[np.uint8], tuple[Detection, ...]]) -> Iterator[HttpServer]:
    img, dets = bus_frame
    hub = PreviewHub(max_fps=2.0)
    srv = HttpServer(Provider(), Provider(), hub, port=0)
    srv.start()
    stop = threading.Event()

    def feed() -> None:  # the pipeline's side: every frame offered, the hub keeps <= 2 fps
        seq = 0
        h, w = img.shape[:2]
        while not stop.wait(0.05):
            seq += 1
            hub.offer("cam", img, FrameResult("cam", seq, time.time(), time.monotonic(), w, h, dets, 0, 0))

    feeder = threading.Thread(target=feed, name="feeder", daemon=True)
    feeder.start()
    try:
        yield srv
    finally:
        stop.set()
        feeder.join(2)
        assert srv.stop(5.0)


def screenshot(url: str, tmp_path: Path) -> NDArray[np.uint8]:
    assert CHROMIUM is not None
    out = tmp_path / "shot.png"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--timeout=5000",
           f"--screenshot={out}", url]
    env = {**os.environ, "HOME": str(tmp_path)}
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    print(f"chromium took {time.monotonic() - t0:.1f} s")
    assert out.exists(), f"no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    img = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert img is not None
    return np.asarray(img, dtype=np.uint8)


def color_pixels(img: NDArray[np.uint8], color: tuple[int, int, int], tol: int = 30) -> int:
    diff = np.abs(img.astype(np.int16) - np.array(color, dtype=np.int16)).max(axis=2)
    return int((diff <= tol).sum())


def test_preview_stream_in_chromium(live_server: HttpServer, tmp_path: Path) -> None:
    shot = screenshot(f"{live_server.url}/preview/cam", tmp_path)
    assert shot.shape[:2] == (800, 1000)
    gray = cv2.cvtColor(shot, cv2.COLOR_BGR2GRAY)
    assert float(gray.std()) > 20.0, "blank screenshot"
    assert color_pixels(shot, class_color(0)) > 500, "no person box color"  # person boxes
    assert color_pixels(shot, class_color(5)) > 500, "no bus box color"  # bus box


def test_index_page_shows_the_latest_frame(live_server: HttpServer, tmp_path: Path) -> None:
    shot = screenshot(f"{live_server.url}/", tmp_path)
    assert float(cv2.cvtColor(shot, cv2.COLOR_BGR2GRAY).std()) > 20.0
    assert color_pixels(shot, class_color(5)) > 200, "the index thumbnail shows no bus box"
