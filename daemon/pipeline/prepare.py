"""CPU stage 1: JPEG bytes (or raw pixels) -> letterboxed model input, written into a reused batch buffer.

With delta caching a frame takes one of three ways: FULL (its own batch slot), SKIP (no slot; cached boxes are
published), or REGIONS (its changed regions, at native scale, are packed with other frames' regions onto shared
canvases, so several cameras' changes cost one inference slot).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.decode.jpeg import DecodeError, decode_jpeg
from daemon.decode.letterbox import letterbox_into, letterbox_params
from daemon.delta.packing import pack_positions
from daemon.delta.policy import Decision, Rect, Verdict
from daemon.delta.signature import luma_signature
from daemon.delta.tracker import DeltaTracker, content_rect
from daemon.pipeline.settings import CameraSettings
from daemon.types import EndOfStream, Frame, FrameError, Letterbox

PAD_VALUE = 114.0 / 255.0
CANVAS_GAP = 0
CANVAS_ALIGN = 32  # the model's largest stride: crops keep their grid phase (see daemon.delta.packing.pack)


@dataclass(frozen=True, slots=True)
class Placement:
    """One region of a frame on a canvas slot: canvas pixels (x, y) hold model-input rect ``region``."""

    slot: int
    x: int
    y: int
    region: Rect


@dataclass(frozen=True, slots=True)
class Prepared:
    """A decoded frame and where its pixels went in the batch."""

    frame: Frame
    verdict: Verdict
    slot: int  # FULL: its batch row; otherwise -1
    placements: tuple[Placement, ...]  # REGIONS: its crops on canvases
    letterbox: Letterbox
    offset: tuple[int, int]  # ROI origin in source pixels
    src_w: int
    src_h: int
    bytes_decoded: int
    decode_s: float
    inferred_fraction: float  # of the frame's content pixels that went to inference
    image: NDArray[np.uint8] | None  # the decoded source frame on the host (previews); None on the GPU path
    bytes_h2d: int = 0  # what this frame cost in host-to-device copies (GPU path)
    features: bool = False  # delta.mode features: its row goes to the feature stage, not the engine


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    tensor: Any  # (capacity, 3, H, W) numpy or CuPy; rows [0, rows) are valid
    rows: int
    items: tuple[Prepared, ...]
    errors: tuple[FrameError, ...]
    feature_rows: int = 0  # the last rows, [rows - feature_rows, rows), are features-mode frames (FeatureStage)
    owed: int = 0  # decoded pictures that found no row here: prepare again (no frames) before the ends go on


@dataclass(slots=True)
class _Decoded:
    frame: Frame
    view: NDArray[np.uint8]
    image: NDArray[np.uint8]
    offset: tuple[int, int]
    lb: Letterbox
    verdict: Verdict
    decode_s: float


class Preparer(Protocol):
    """Stage 1: frames -> model input rows in ``buffer`` (host or device), plus what each frame became."""

    def prepare(self, frames: Sequence[Frame], buffer: Any, settings_of: Callable[[str], CameraSettings | None],
                ends: Sequence[EndOfStream] = ()) -> PreparedBatch:
        """``ends``: the cameras whose stream ended with this batch (a decoder holding pictures flushes them)."""


class CpuPreparer:
    """Decodes and letterboxes frames on the CPU into a caller-supplied batch buffer."""

    def __init__(self, input_size: int, max_pixels: int, max_jpeg_bytes: int,
                 delta: DeltaTracker | None = None, clock: Callable[[], float] = time.monotonic,
                 features: Callable[[str], bool] | None = None) -> None:
        self._features = features  # cameras in delta.mode features
        self._size = input_size
        self._max_pixels = max_pixels
        self._max_jpeg_bytes = max_jpeg_bytes
        self._delta = delta
        self._clock = clock
        self._scratch = np.empty((3, input_size, input_size), dtype=np.float32)

    def prepare(
        self,
        frames: Sequence[Frame],
        buffer: NDArray[np.float32],
        settings_of: Callable[[str], CameraSettings | None],
        ends: Sequence[EndOfStream] = (),  # nothing to flush: this preparer decodes each frame whole
    ) -> PreparedBatch:
        decoded: list[_Decoded] = []
        errors: list[FrameError] = []
        for frame in frames:
            t0 = time.perf_counter()
            try:
                image = self._decode(frame)
            except DecodeError as exc:
                errors.append(FrameError(frame.camera, frame.seq, exc.kind, str(exc)))
                continue
            view, offset = apply_roi_and_mask(image, settings_of(frame.camera))
            lb = letterbox_params(view.shape[1], view.shape[0], self._size)
            verdict = Verdict(Decision.FULL, "delta off")
            if self._delta is not None and self._delta.enabled(frame.camera):
                sig = luma_signature(view, lb, self._size)
                verdict = self._delta.plan(frame.camera, sig, lb, self._clock())
            decoded.append(_Decoded(frame, view, image, offset, lb, verdict, time.perf_counter() - t0))
        feat = [d for d in decoded if self._features is not None and d.verdict.decision is not Decision.SKIP
                and self._features(d.frame.camera)]
        rows, items = self._fill([d for d in decoded if not any(d is f for f in feat)], buffer, len(feat))
        for k, d in enumerate(feat):
            t0 = time.perf_counter()
            row = rows + k
            letterbox_into(d.view, self._size, buffer[row])
            fraction = 1.0 if d.verdict.decision is Decision.FULL else \
                sum(r.area for r in d.verdict.regions) / max(content_rect(d.lb).area, 1)
            items.append(Prepared(
                d.frame, d.verdict, row, (), d.lb, d.offset, d.image.shape[1], d.image.shape[0], int(d.image.nbytes),
                d.decode_s + time.perf_counter() - t0, fraction, d.image, features=True,
            ))
        order = {id(d.frame): i for i, d in enumerate(decoded)}
        items.sort(key=lambda it: order[id(it.frame)])
        return PreparedBatch(buffer, rows + len(feat), tuple(items), tuple(errors), len(feat))

    def _fill(self, decoded: list[_Decoded], buffer: NDArray[np.float32],
              reserved: int = 0) -> tuple[int, list[Prepared]]:
        placements, canvases, n_full = fit_regions(decoded, self._size, buffer.shape[0] - reserved, self._delta)
        slot = 0
        items: list[Prepared] = []
        canvas_base = n_full
        for c in range(canvases):
            buffer[canvas_base + c].fill(PAD_VALUE)
        for d in decoded:
            t0 = time.perf_counter()
            full_area = max(content_rect(d.lb).area, 1)
            own: tuple[Placement, ...] = ()
            row = -1
            if d.verdict.decision is Decision.FULL:
                row, slot = slot, slot + 1
                letterbox_into(d.view, self._size, buffer[row])
                fraction = 1.0
            elif d.verdict.decision is Decision.REGIONS:
                letterbox_into(d.view, self._size, self._scratch)
                own = tuple(Placement(canvas_base + c, x, y, r) for (c, x, y, r) in placements[id(d)])
                for p in own:
                    r = p.region
                    buffer[p.slot, :, p.y : p.y + r.y2 - r.y1, p.x : p.x + r.x2 - r.x1] = \
                        self._scratch[:, r.y1 : r.y2, r.x1 : r.x2]
                fraction = sum(r.area for r in d.verdict.regions) / full_area
            else:
                fraction = 0.0
            decode_s = d.decode_s + time.perf_counter() - t0
            items.append(Prepared(
                d.frame, d.verdict, row, own, d.lb, d.offset, d.image.shape[1], d.image.shape[0],
                int(d.image.nbytes), decode_s, fraction, d.image,
            ))
        return n_full + canvases, items

    def _decode(self, frame: Frame) -> NDArray[np.uint8]:
        if frame.pixels is not None:
            px = frame.pixels
            if px.ndim != 3 or px.shape[2] != 3 or px.dtype != np.uint8:
                raise DecodeError("corrupt", f"raw frame must be HxWx3 uint8, got {px.shape} {px.dtype}")
            if px.shape[0] * px.shape[1] > self._max_pixels:
                raise DecodeError("too_large", f"frame {px.shape[1]}x{px.shape[0]} exceeds {self._max_pixels} px")
            return px
        data = frame.jpeg or b""
        if len(data) > self._max_jpeg_bytes:
            raise DecodeError("too_large", f"JPEG of {len(data)} bytes exceeds {self._max_jpeg_bytes}")
        return decode_jpeg(data, self._max_pixels)


class _Planned(Protocol):
    frame: Frame
    verdict: Verdict


class _HasVerdict(Protocol):
    verdict: Verdict


def pack_regions(
    regions: Sequence[_HasVerdict], size: int
) -> tuple[dict[int, list[tuple[int, int, int, Rect]]], int]:
    """Every region of these frames on shared canvases: {id(frame): [(canvas, x, y, rect)]}, canvas count."""
    out: dict[int, list[tuple[int, int, int, Rect]]] = {}
    rects: list[Rect] = []
    owners: list[list[tuple[int, int, int, Rect]]] = []
    for d in regions:
        own = out.setdefault(id(d), [])
        rs = d.verdict.regions
        rects += rs
        owners += [own] * len(rs)
    placed, canvases = pack_positions([(r.x2 - r.x1, r.y2 - r.y1) for r in rects], size, gap=CANVAS_GAP,
                                      align=CANVAS_ALIGN)
    for own, rect, (c, x, y) in zip(owners, rects, placed, strict=True):
        own.append((c, x, y, rect))
    return out, canvases


def fit_regions(items: Sequence[_Planned], size: int, capacity: int, delta: DeltaTracker | None
                ) -> tuple[dict[int, list[tuple[int, int, int, Rect]]], int, int]:
    """Pack the REGIONS frames' regions onto canvases so that FULL rows + canvases fit ``capacity`` rows; where
    they cannot (rare), the frame with the largest regions goes FULL instead (the tracker is told, so the frame
    in flight is the one its new verdict resolves). Returns (placements, canvas count, FULL count)."""
    regions = [d for d in items if d.verdict.decision is Decision.REGIONS]
    n_full = sum(1 for d in items if d.verdict.decision is Decision.FULL)
    placements, canvases = pack_regions(regions, size)
    while regions and n_full + canvases > capacity:
        big = max(regions, key=lambda d: sum(r.area for r in d.verdict.regions))
        new = Verdict(Decision.FULL, "no canvas room")
        if delta is not None:
            delta.supersede(big.frame.camera, big.verdict, new)
        big.verdict = new
        regions.remove(big)
        n_full += 1
        placements, canvases = pack_regions(regions, size)
    return placements, canvases, n_full


def apply_roi_and_mask(
    image: NDArray[np.uint8], settings: CameraSettings | None
) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    if settings is None:
        return image, (0, 0)
    if settings.mask:
        image = image if image.flags.writeable else image.copy()
        cv2.fillPoly(image, list(settings.mask), (114, 114, 114))
    if settings.roi is None:
        return image, (0, 0)
    h, w = image.shape[:2]
    x1, y1, x2, y2 = settings.roi
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 1), w)
    y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 1), h)
    if x2 <= x1 or y2 <= y1:
        return image, (0, 0)
    return image[y1:y2, x1:x2], (x1, y1)
