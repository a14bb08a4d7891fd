"""Small pieces several runtime tests share: a publisher that keeps every result, and vtest frames as JPEG bytes."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2

from daemon.publish import NullPublisher
from daemon.types import FrameResult


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
