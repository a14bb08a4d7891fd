"""Replays a video file or a folder of JPEGs as if it were an MJPEG camera.

Video frames are decoded with OpenCV and re-encoded to JPEG (simplejpeg), so the pipeline sees what an MJPEG
camera sends; folder JPEGs are passed byte for byte (broken files included: the pipeline rejects those).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from numpy.typing import NDArray

from daemon.sources.base import Sink, Source, SourceError

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = 10.0
DEFAULT_VIDEO_FPS = 25.0
MAX_LAG_S = 1.0  # a realtime replay further behind than this restarts its schedule instead of bursting


def encode_jpeg(bgr: NDArray[np.uint8], quality: int) -> bytes:
    """BGR HxWx3 uint8 -> JPEG bytes (4:2:0, as most IP cameras send)."""
    data: bytes = simplejpeg.encode_jpeg(np.ascontiguousarray(bgr), quality=quality, colorspace="BGR")
    return data


def list_jpegs(folder: Path) -> list[Path]:
    """The *.jpg / *.jpeg files of a folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in JPEG_SUFFIXES and p.is_file())


def _open_video(path: Path) -> cv2.VideoCapture:
    if not path.exists():
        raise SourceError(f"replay file {path} does not exist")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise SourceError(f"cannot open {path} as a video (unreadable file or unsupported format)")
    return cap


def iter_video_jpegs(path: Path, quality: int, limit: int | None = None) -> Iterator[bytes]:
    """Decode a video and yield each frame as JPEG bytes; raises SourceError when nothing can be decoded."""
    cap = _open_video(path)
    try:
        n = 0
        while limit is None or n < limit:
            ok, img = cap.read()
            if not ok or img is None:
                break
            yield encode_jpeg(np.asarray(img, dtype=np.uint8), quality)
            n += 1
        if n == 0:
            raise SourceError(f"no frame could be decoded from {path}")
    finally:
        cap.release()


def load_jpeg_frames(path: Path | str, quality: int = 90, limit: int | None = None) -> list[bytes]:
    """All frames of a video (re-encoded) or of a JPEG folder (as stored), in memory; share the list between
    cameras replaying the same file (``ReplaySource(frames=...)``). Raises SourceError naming the path."""
    p = Path(path)
    if p.is_dir():
        files = list_jpegs(p)[:limit]
        if not files:
            raise SourceError(f"folder {p} holds no .jpg/.jpeg files")
        try:
            return [f.read_bytes() for f in files]
        except OSError as exc:
            raise SourceError(f"cannot read {exc.filename}: {exc.strerror}") from exc
    return list(iter_video_jpegs(p, quality, limit))


def probe_fps(path: Path) -> float:
    """The video's own frame rate (DEFAULT_FOLDER_FPS for folders, DEFAULT_VIDEO_FPS when unknown)."""
    if path.is_dir():
        return DEFAULT_FOLDER_FPS
    cap = cv2.VideoCapture(str(path))
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS)) if cap.isOpened() else 0.0
    finally:
        cap.release()
    return fps if math.isfinite(fps) and 0 < fps <= 1000 else DEFAULT_VIDEO_FPS


class ReplaySource(Source):
    """A video file or a JPEG folder replayed as a camera.

    ``realtime`` paces at the file's fps (or ``fps``); otherwise frames go out as fast as the sink takes them.
    ``preload`` encodes everything once before the first frame; ``frames`` hands in an already loaded list
    (from ``load_jpeg_frames``) shared by many cameras, in which case ``path`` is only probed for its fps.
    """

    def __init__(
        self,
        camera: str,
        path: Path | str,
        sink: Sink,
        fps: float | None = None,
        loop: bool = False,
        realtime: bool = True,
        jpeg_quality: int = 90,
        preload: bool = False,
        max_fps: float | None = None,
        frames: Sequence[bytes] | None = None,
    ) -> None:
        super().__init__(camera, sink, max_fps=max_fps)
        if fps is not None and not 0 < fps <= 1000:
            raise ValueError(f"camera {camera!r}: replay fps must be in (0, 1000], got {fps}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"camera {camera!r}: jpeg_quality must be in [1, 100], got {jpeg_quality}")
        if frames is not None and len(frames) == 0:
            raise ValueError(f"camera {camera!r}: preloaded frame list for {path} is empty")
        self._path = Path(path)
        self._fps = fps
        self._loop = loop
        self._realtime = realtime
        self._quality = jpeg_quality
        self._preload = preload
        self._frames = frames

    def _run(self) -> None:
        try:
            frames = self._frames
            if frames is None and self._preload:
                started = time.monotonic()
                frames = load_jpeg_frames(self._path, self._quality)
                log.info("camera %s: preloaded %d frames of %s in %.1f s",
                         self.camera, len(frames), self._path, time.monotonic() - started)
            period = 1.0 / (self._fps or probe_fps(self._path)) if self._realtime else 0.0
            self._replay(frames, period)
        except SourceError as exc:
            self._fail(str(exc))

    def _passes(self, frames: Sequence[bytes] | None) -> Iterator[Iterator[bytes | NDArray[np.uint8]]]:
        """One iterator per pass over the file (one pass unless looping). Items are JPEG bytes, or decoded
        pixels that are encoded only once past the fps cap."""
        first = True
        while first or self._loop:
            first = False
            if frames is not None:
                yield iter(frames)
            elif self._path.is_dir():
                yield self._folder_pass()
            else:
                yield self._video_pass()

    def _replay(self, frames: Sequence[bytes] | None, period: float) -> None:
        t0 = time.monotonic()
        n = 0
        for one_pass in self._passes(frames):
            for item in one_pass:
                if period > 0:
                    due = t0 + n * period
                    lag = time.monotonic() - due
                    if lag > MAX_LAG_S:
                        t0, n = time.monotonic(), 0
                    elif lag < 0 and not self._wait(-lag):
                        return
                n += 1
                if self._stopping:
                    return
                mono = self._admit()
                if mono is None:
                    continue
                data = item if isinstance(item, bytes) else encode_jpeg(item, self._quality)
                self._add_bytes(len(data))
                self._push_jpeg(data, mono)
            if self._stopping:
                return
        self._end(f"end of {self._path.name}")

    def _folder_pass(self) -> Iterator[bytes]:
        files = list_jpegs(self._path)
        if not files:
            raise SourceError(f"folder {self._path} holds no .jpg/.jpeg files")
        for f in files:
            if self._stopping:
                return
            try:
                yield f.read_bytes()
            except OSError as exc:  # a file removed or unreadable mid-replay: counted, replay goes on
                self._reject(f"cannot read {f}: {exc.strerror}")

    def _video_pass(self) -> Iterator[NDArray[np.uint8]]:
        cap = _open_video(self._path)
        try:
            n = 0
            while not self._stopping:
                ok, img = cap.read()
                if not ok or img is None:
                    break
                n += 1
                yield np.asarray(img, dtype=np.uint8)
            if n == 0 and not self._stopping:
                raise SourceError(f"no frame could be decoded from {self._path}")
        finally:
            cap.release()
