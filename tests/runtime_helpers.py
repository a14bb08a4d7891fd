"""Small pieces several runtime tests share: a publisher that keeps every result, vtest frames as JPEG bytes, a
replay run to its end with what it wrote."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import Config
from daemon.outputs.jsonl import JsonlPublisher
from daemon.publish import NullPublisher
from daemon.sources.replay import ReplaySource as ReplayReader
from daemon.types import Detection, FrameResult


class ResultCollector(NullPublisher):
    """Keeps every published result (any thread)."""

    def __init__(self) -> None:
        self.results: list[FrameResult] = []
        self.lock = threading.Lock()

    def publish_result(self, result: FrameResult) -> None:
        with self.lock:
            self.results.append(result)


def vtest_jpegs(vtest_path: Path, count: int, quality: int = 90) -> list[bytes]:
    """The first ``count`` vtest frames, JPEG-encoded at ``quality``."""
    cap = cv2.VideoCapture(str(vtest_path))
    out: list[bytes] = []
    while len(out) < count:
        ok, img = cap.read()
        if not ok:
            break
        out.append(bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()))
    cap.release()
    return out


def replay_to_end(cfg: Config, choice: EngineChoice, frames: list[bytes], out: Path,
                  timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Every camera of ``cfg`` replays ``frames`` once, as fast as the pipeline takes them; the records the run
    wrote to ``out`` (detections, stats, camera states), in order."""
    rt = Runtime(cfg, [JsonlPublisher(str(out))], engine=choice,
                 source_factory=lambda cam, to: ReplayReader(cam.id, "t", to, loop=False, realtime=False,
                                                             frames=frames))
    rt.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not rt.all_ended() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        rt.stop(10)
    return [json.loads(line) for line in out.read_text().splitlines()]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4+) with every box of ``b`` (m, 4+), x1 y1 x2 y2 first: (n, m)."""
    x1, y1 = np.maximum(a[:, None, 0], b[None, :, 0]), np.maximum(a[:, None, 1], b[None, :, 1])
    x2, y2 = np.minimum(a[:, None, 2], b[None, :, 2]), np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9))


def boxes_found(want: list[Detection], got: list[Detection], iou: float = 0.7) -> int:
    """How many of ``want``'s boxes one of ``got``'s overlaps by more than ``iou``."""
    a = np.array([[d.x1, d.y1, d.x2, d.y2] for d in want]).reshape(-1, 4)
    b = np.array([[d.x1, d.y1, d.x2, d.y2] for d in got]).reshape(-1, 4)
    return int((iou_matrix(a, b).max(axis=1) > iou).sum()) if len(a) and len(b) else 0
