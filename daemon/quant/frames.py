"""Frames for calibration and fidelity checks, as JPEG bytes, preprocessed exactly like the live CPU pipeline.

A frame source is written ``PATH[@START:STOP]``: a video (each frame re-encoded to JPEG at quality 90 by the
replay source's own encoder, so calibration sees camera-like bytes), a folder of JPEGs (sorted by name, bytes as
stored) or a single JPEG file. ``@START:STOP[:STEP]`` selects frames by index like a Python slice
(``vtest.avi@:300`` for calibration, ``vtest.avi@300:`` for evaluation on the rest, ``vtest.avi@:300:3`` for every
third of the first 300).

Preprocessing is the pipeline's: :func:`daemon.decode.jpeg.decode_jpeg` then
:func:`daemon.decode.letterbox.letterbox_into` (RGB, [0, 1], gray-114 letterbox).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.sources.base import SourceError
from daemon.sources.replay import JPEG_SUFFIXES, iter_video_jpegs, list_jpegs
from daemon.types import Letterbox

log = logging.getLogger(__name__)

DEFAULT_JPEG_QUALITY = 90  # what the replay source encodes video frames with
DEFAULT_MAX_PIXELS = 40_000_000  # the daemon's default limits.max_pixels
_SPEC = re.compile(r"^(?P<path>.+?)@(?P<start>-?\d*):(?P<stop>-?\d*)(?::(?P<step>\d+))?$")


class FrameSourceError(Exception):
    """A frame source could not be read; the message names the source."""


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """One frame: where it came from (``path#index``), its JPEG bytes and a short digest of them."""

    name: str
    jpeg: bytes

    @property
    def digest(self) -> str:
        """First 16 hex digits of the sha256 of the JPEG bytes (identifies a frame across runs)."""
        return hashlib.sha256(self.jpeg).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class FrameSpec:
    """A parsed ``PATH[@START:STOP[:STEP]]``."""

    path: Path
    start: int | None = None
    stop: int | None = None
    step: int | None = None

    @classmethod
    def parse(cls, text: str) -> FrameSpec:
        m = _SPEC.match(text)
        if m is None:
            return cls(Path(text).expanduser())
        start, stop, step = m.group("start"), m.group("stop"), m.group("step")
        if step is not None and int(step) < 1:
            raise FrameSourceError(f"frame source {text!r}: step must be >= 1")
        return cls(Path(m.group("path")).expanduser(), int(start) if start else None, int(stop) if stop else None,
                   int(step) if step else None)

    def with_path(self, path: Path) -> FrameSpec:
        return FrameSpec(path, self.start, self.stop, self.step)

    def __str__(self) -> str:
        if self.start is None and self.stop is None and self.step is None:
            return str(self.path)
        text = f"{self.path}@{_opt(self.start)}:{_opt(self.stop)}"
        return text if self.step is None else f"{text}:{self.step}"


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def load_frames(spec: FrameSpec | str, quality: int = DEFAULT_JPEG_QUALITY) -> list[SourceFrame]:
    """The frames of one source, in order. Raises :class:`FrameSourceError` naming the source."""
    s = FrameSpec.parse(spec) if isinstance(spec, str) else spec
    p = s.path
    if not p.exists():
        raise FrameSourceError(f"frame source {s}: {p} does not exist")
    window = slice(s.start, s.stop, s.step)
    try:
        if p.is_dir():
            files = list_jpegs(p)
            if not files:
                raise FrameSourceError(f"frame source {s}: folder {p} holds no .jpg/.jpeg files")
            chosen = list(enumerate(files))[window]
            frames = [SourceFrame(f"{p}#{f.name}", f.read_bytes()) for _, f in chosen]
        elif p.suffix.lower() in JPEG_SUFFIXES:
            frames = [SourceFrame(str(p), p.read_bytes())][window]
        else:
            stop = s.stop if s.stop is not None and s.stop >= 0 and (s.start is None or s.start >= 0) else None
            jpegs = list(enumerate(iter_video_jpegs(p, quality, stop)))[window]
            frames = [SourceFrame(f"{p}#{i}", data) for i, data in jpegs]
    except OSError as exc:
        raise FrameSourceError(f"frame source {s}: cannot read {exc.filename}: {exc.strerror}") from exc
    except SourceError as exc:  # from the replay helpers (unreadable video...): keep the message, name the spec
        raise FrameSourceError(f"frame source {s}: {exc}") from exc
    if not frames:
        raise FrameSourceError(f"frame source {s}: the selection holds no frames")
    log.info("frame source %s: %d frames", s, len(frames))
    return frames


def load_all(specs: Sequence[FrameSpec | str], quality: int = DEFAULT_JPEG_QUALITY) -> list[SourceFrame]:
    """Frames of several sources, concatenated in the given order."""
    out: list[SourceFrame] = []
    for spec in specs:
        out.extend(load_frames(spec, quality))
    return out


@dataclass(frozen=True, slots=True)
class PreparedFrame:
    """A frame after the live pipeline's preprocessing: (3, H, W) float32 RGB [0, 1] and its letterbox."""

    name: str
    tensor: NDArray[np.float32]
    letterbox: Letterbox


def prepare(frame: SourceFrame, input_hw: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedFrame:
    """Decode and letterbox one frame exactly as the CPU pipeline does."""
    h, w = input_hw
    image = decode_jpeg(frame.jpeg, max_pixels)
    out = np.empty((3, h, w), dtype=np.float32)
    lb = letterbox_into(image, (h, w) if h != w else h, out)
    return PreparedFrame(frame.name, out, lb)


def iter_prepared(
    frames: Sequence[SourceFrame], input_hw: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[PreparedFrame]:
    """Prepare frames one at a time (a few MB each: never all of them in memory at once)."""
    for frame in frames:
        yield prepare(frame, input_hw, max_pixels)
