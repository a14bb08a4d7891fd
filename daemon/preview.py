"""Latest annotated JPEG per camera for the live preview, made at a low rate.

``PreviewHub.offer`` sits on the pipeline's hot path: it returns at once unless a preview frame is due
for that camera (``max_fps`` while someone watches, one every ``idle_interval_s`` otherwise), and only
then downsizes, annotates and encodes one frame (a few ms). HTTP handlers wait on the hub for newer frames.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray

from daemon.annotate import Rect, annotate
from daemon.types import FrameResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PreviewFrame:
    """One annotated preview image."""

    camera: str
    version: int  # increases by one per preview frame of this hub
    seq: int  # the source frame's sequence number
    jpeg: bytes
    width: int
    height: int
    cached: bool
    detections: int
    made_mono: float


@dataclass(slots=True)
class _Slot:
    next_due: float = 0.0
    viewers: int = 0
    frame: PreviewFrame | None = None
    failures: int = 0


class PreviewHub:
    """Keeps the latest annotated JPEG per camera; thread-safe."""

    def __init__(
        self,
        max_fps: float = 2.0,
        idle_interval_s: float = 5.0,
        max_width: int = 960,
        jpeg_quality: int = 75,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < max_fps <= 30:
            raise ValueError(f"preview max_fps must be in (0, 30], got {max_fps!r}")
        if idle_interval_s <= 0:
            raise ValueError(f"preview idle_interval_s must be > 0, got {idle_interval_s!r}")
        if max_width < 64:
            raise ValueError(f"preview max_width must be >= 64, got {max_width!r}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"preview jpeg_quality must be in [1, 100], got {jpeg_quality!r}")
        self._period = 1.0 / max_fps
        self._idle = max(idle_interval_s, self._period)
        self._max_width = max_width
        self._quality = jpeg_quality
        self._clock = clock
        self._cond = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self._version = 0
        self._closed = False

    # -- producer side --------------------------------------------------------------------------------------
    def offer(
        self,
        camera: str,
        image: NDArray[np.uint8] | bytes,
        result: FrameResult,
        regions: Sequence[Rect] = (),
    ) -> bool:
        """Take this frame for the preview if one is due; True when it was taken. Never raises."""
        now = self._clock()
        with self._cond:
            slot = self._slots.setdefault(camera, _Slot())
            if self._closed or now < slot.next_due:
                return False
            slot.next_due = now + (self._period if slot.viewers > 0 else self._idle)
        try:
            jpeg, w, h = self._render(image, result, regions)
        except Exception as exc:
            with self._cond:
                slot.failures += 1
                n = slot.failures
            if n & (n - 1) == 0:  # 1, 2, 4, 8...: a broken camera must not flood the log
                log.warning("preview %s: frame %d not rendered (%d so far): %s", camera, result.seq, n, exc)
            return False
        with self._cond:
            self._version += 1
            slot.frame = PreviewFrame(camera, self._version, result.seq, jpeg, w, h, result.cached,
                                      len(result.detections), self._clock())
            self._cond.notify_all()
        return True

    def _render(
        self, image: NDArray[np.uint8] | bytes, result: FrameResult, regions: Sequence[Rect]
    ) -> tuple[bytes, int, int]:
        if isinstance(image, bytes | bytearray | memoryview):
            bgr = simplejpeg.decode_jpeg(bytes(image), colorspace="BGR", fastdct=True, fastupsample=True,
                                         min_width=min(self._max_width, result.width or self._max_width))
        else:
            bgr = image
        src_w = result.width or int(bgr.shape[1])
        if bgr.shape[1] > self._max_width:
            h = round(bgr.shape[0] * self._max_width / bgr.shape[1])
            bgr = cv2.resize(bgr, (self._max_width, h), interpolation=cv2.INTER_AREA)
        scale = bgr.shape[1] / src_w
        state = f"cached {result.cache_age_s:.1f}s" if result.cached else "fresh"
        caption = f"{result.camera} #{result.seq} {state} {len(result.detections)} boxes"
        out = annotate(bgr, result.detections, result.cached, regions, caption, scale)
        jpeg = simplejpeg.encode_jpeg(out, quality=self._quality, colorspace="BGR", fastdct=True)
        return bytes(jpeg), int(out.shape[1]), int(out.shape[0])

    def remove(self, camera: str) -> None:
        """Forget a removed camera (its viewers see the stream end)."""
        with self._cond:
            self._slots.pop(camera, None)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting viewer; offers are ignored from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- consumer side --------------------------------------------------------------------------------------
    def cameras(self) -> tuple[str, ...]:
        with self._cond:
            return tuple(sorted(self._slots))

    def latest(self, camera: str) -> PreviewFrame | None:
        with self._cond:
            slot = self._slots.get(camera)
            return None if slot is None else slot.frame

    def viewers(self, camera: str) -> int:
        with self._cond:
            slot = self._slots.get(camera)
            return 0 if slot is None else slot.viewers

    def wait_next(self, camera: str, after_version: int, timeout: float) -> PreviewFrame | None:
        """The camera's latest frame once it is newer than ``after_version``; None on timeout or close."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._closed:
                slot = self._slots.get(camera)
                if slot is not None and slot.frame is not None and slot.frame.version > after_version:
                    return slot.frame
                left = deadline - self._clock()
                if left <= 0:
                    return None
                self._cond.wait(left)
        return None

    @contextmanager
    def watch(self, camera: str) -> Iterator[None]:
        """Mark a viewer of ``camera`` for the duration: frames are then made at ``max_fps``."""
        with self._cond:
            slot = self._slots.setdefault(camera, _Slot())
            slot.viewers += 1
            slot.next_due = min(slot.next_due, self._clock() + self._period)
        try:
            yield
        finally:
            with self._cond:
                cur = self._slots.get(camera)
                if cur is not None:
                    cur.viewers = max(0, cur.viewers - 1)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed


__all__ = ["PreviewFrame", "PreviewHub"]
