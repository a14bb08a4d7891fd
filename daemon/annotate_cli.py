"""`deltayolo annotate`: run a video through the pipeline and write what a person needs to judge the result:
boxes (fresh solid, cached dashed gray), the regions delta caching inferred (cyan), and the decision per frame."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.annotate import Rect, annotate
from daemon.app import Runtime
from daemon.config.model import (
    BatchingConfig,
    CameraConfig,
    Config,
    DeltaConfig,
    ModelConfig,
    NodeConfig,
    ReplaySource,
    StatsConfig,
)
from daemon.types import FrameResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", default="builtin:vtest", help="video file or folder of JPEGs")
    p.add_argument("--model", default="builtin:yolov8n", help="ONNX model")
    p.add_argument("--out", required=True, type=Path, help="output .avi (MJPEG) or a folder for JPEGs")
    p.add_argument("--delta", action="store_true", help="delta caching on (default settings)")
    p.add_argument("--frames", type=int, default=0, help="stop after this many frames (0: whole video)")


class _Writer:
    def __init__(self, out: Path, limit: int) -> None:
        self._out = out
        self._limit = limit
        self._video: cv2.VideoWriter | None = None
        self._lock = threading.Lock()
        self.frames = 0
        self.done = threading.Event()
        if out.suffix.lower() != ".avi":
            out.mkdir(parents=True, exist_ok=True)

    def offer(self, camera: str, image: NDArray[np.uint8], result: FrameResult) -> bool:
        regions = [Rect(*r) for r in result.regions]
        caption = f"#{result.seq} {result.decision} inferred {result.inferred_fraction:.0%}"
        frame = annotate(image, result.detections, cached=result.cached, regions=regions, caption=caption)
        with self._lock:
            if self.done.is_set():
                return False
            if self._out.suffix.lower() == ".avi":
                if self._video is None:
                    h, w = frame.shape[:2]
                    self._video = cv2.VideoWriter(str(self._out), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (w, h))
                self._video.write(frame)
            else:
                cv2.imwrite(str(self._out / f"{result.seq:06d}.jpg"), frame)
            self.frames += 1
            if self._limit and self.frames >= self._limit:
                self.done.set()
        return True

    def close(self) -> None:
        with self._lock:
            if self._video is not None:
                self._video.release()


def run_annotate(args: argparse.Namespace) -> int:
    cam = CameraConfig(id="video", source=ReplaySource(type="replay", path=args.video, realtime=False, loop=False),
                       queue_size=8)
    cfg = Config(node=NodeConfig(site="annotate", area="a", line="l", node="n"), model=ModelConfig(path=args.model),
                 cameras=(cam,), batching=BatchingConfig(max_batch=4, max_wait_ms=5),
                 delta=DeltaConfig(enabled=args.delta), stats=StatsConfig(interval_s=3600))
    writer = _Writer(args.out, args.frames)
    rt = Runtime(cfg, observers=[writer])
    rt.start()
    try:
        while not rt.all_ended() and not writer.done.is_set():
            time.sleep(0.2)
    finally:
        rt.stop(15.0)
        writer.close()
    print(f"wrote {writer.frames} annotated frames to {args.out}")
    return 0
