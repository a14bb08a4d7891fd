"""GPU stage 1 for the staged runner: JPEG bytes -> DALI -> letterboxed device tensors in the batch buffer, with
delta caching's signature computed on the device (only 1/64 of the luma comes back to the host)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.decode.jpeg import DecodeError, decode_jpeg, jpeg_size
from daemon.decode.letterbox import letterbox_into, letterbox_params
from daemon.delta.policy import Decision, Verdict
from daemon.delta.tracker import DeltaTracker, content_rect
from daemon.gpu.dali_decode import DaliDecoder, luma_signatures
from daemon.pipeline.prepare import PAD_VALUE, Placement, Prepared, PreparedBatch, apply_roi_and_mask, pack_regions
from daemon.pipeline.settings import CameraSettings
from daemon.types import Frame, FrameError, Letterbox

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Ok:
    frame: Frame
    lb: Letterbox
    w: int
    h: int
    verdict: Verdict
    index: int  # row in the decoded device batch
    offset: tuple[int, int] = (0, 0)  # ROI origin (host-decoded frames only)
    uploaded: int = 0  # bytes of a host-letterboxed tensor sent to the device instead of JPEG bytes


class GpuPreparer:
    def __init__(self, decoder: DaliDecoder, max_pixels: int, max_jpeg_bytes: int,
                 delta: DeltaTracker | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._dec = decoder
        self._size = decoder.size
        self._max_pixels = max_pixels
        self._max_jpeg_bytes = max_jpeg_bytes
        self._delta = delta
        self._clock = clock
        self.bytes_h2d = 0

    def prepare(self, frames: Sequence[Frame], buffer: Any,
                settings_of: Callable[[str], CameraSettings | None]) -> PreparedBatch:
        import cupy

        t0 = time.perf_counter()
        errors: list[FrameError] = []
        ok: list[_Ok] = []
        jpegs: list[bytes] = []
        host_frames: list[tuple[Frame, NDArray[np.uint8], CameraSettings | None]] = []
        for f in frames:
            try:
                data = self._check(f)
            except DecodeError as exc:
                errors.append(FrameError(f.camera, f.seq, exc.kind, str(exc)))
                continue
            settings = settings_of(f.camera)
            if data is None or (settings is not None and (settings.roi is not None or settings.mask)):
                # raw pixels, or a ROI/mask to apply: decode and letterbox on the host, upload the model input
                try:
                    px = f.pixels if data is None else decode_jpeg(data, self._max_pixels)
                except DecodeError as exc:
                    errors.append(FrameError(f.camera, f.seq, exc.kind, str(exc)))
                    continue
                if px is not None:
                    host_frames.append((f, px, settings))
                continue
            w, h = jpeg_size(data)
            ok.append(_Ok(f, letterbox_params(w, h, self._size), w, h, Verdict(Decision.FULL, "delta off"), len(jpegs)))
            jpegs.append(data)
        dev = self._decode(jpegs, ok, errors)
        for f, px, settings in host_frames:
            view, offset = apply_roi_and_mask(px, settings)
            host = np.empty((3, self._size, self._size), np.float32)
            lb = letterbox_into(view, self._size, host)
            arr = cupy.asarray(host, dtype=self._dec.dtype)[None]
            self.bytes_h2d += host.nbytes
            dev = arr if dev is None else cupy.concatenate([dev, arr])
            ok.append(_Ok(f, lb, px.shape[1], px.shape[0], Verdict(Decision.FULL, "delta off"),
                          int(dev.shape[0]) - 1, offset, int(arr.nbytes)))
        if self._delta is not None and ok and dev is not None:
            sigs = cupy.asnumpy(luma_signatures(dev))
            now = self._clock()
            for o in ok:
                if self._delta.enabled(o.frame.camera):
                    o.verdict = self._delta.plan(o.frame.camera, sigs[o.index], o.lb, now)
        decode_s = (time.perf_counter() - t0) / max(len(frames), 1)
        rows, items = self._fill(ok, dev, buffer, decode_s)
        return PreparedBatch(buffer, rows, tuple(items), tuple(errors))

    def _check(self, f: Frame) -> bytes | None:
        if f.pixels is not None:
            if f.pixels.ndim != 3 or f.pixels.shape[2] != 3 or f.pixels.dtype != np.uint8:
                raise DecodeError("corrupt", f"raw frame must be HxWx3 uint8, got {f.pixels.shape}")
            return None
        data = f.jpeg or b""
        if len(data) > self._max_jpeg_bytes:
            raise DecodeError("too_large", f"JPEG of {len(data)} bytes exceeds {self._max_jpeg_bytes}")
        w, h = jpeg_size(data)
        if w * h > self._max_pixels:
            raise DecodeError("too_large", f"JPEG header says {w}x{h}, over the limit of {self._max_pixels} pixels")
        return data

    def _decode(self, jpegs: list[bytes], ok: list[_Ok], errors: list[FrameError]) -> Any:
        import cupy

        if not jpegs:
            return None
        try:
            dev = self._dec.decode(jpegs)
            self.bytes_h2d += sum(map(len, jpegs))
            return dev
        except Exception as exc:  # one bad frame fails DALI's whole batch: find it by decoding one at a time
            log.debug("DALI batch failed (%s); decoding one by one", exc)
        parts, keep = [], []
        for o, data in zip(list(ok), jpegs, strict=True):
            try:
                parts.append(self._dec.decode([data]))
                keep.append(o)
            except Exception as exc:
                errors.append(FrameError(o.frame.camera, o.frame.seq, "corrupt", f"GPU decoder rejected it: {exc}"))
        ok[:] = keep
        for i, o in enumerate(ok):
            o.index = i
        return cupy.concatenate(parts) if parts else None

    def _fill(self, ok: list[_Ok], dev: Any, buffer: Any, decode_s: float) -> tuple[int, list[Prepared]]:
        capacity = int(buffer.shape[0])
        regions = [o for o in ok if o.verdict.decision is Decision.REGIONS]
        n_full = sum(1 for o in ok if o.verdict.decision is Decision.FULL)
        placements, canvases = pack_regions(regions, self._size)
        while regions and n_full + canvases > capacity:
            big = max(regions, key=lambda o: sum(r.area for r in o.verdict.regions))
            big.verdict = Verdict(Decision.FULL, "no canvas room")
            regions.remove(big)
            n_full += 1
            placements, canvases = pack_regions(regions, self._size)
        for c in range(canvases):
            buffer[n_full + c].fill(PAD_VALUE)
        items: list[Prepared] = []
        row = 0
        for o in ok:
            own: tuple[Placement, ...] = ()
            slot = -1
            fraction = 0.0
            if o.verdict.decision is Decision.FULL:
                slot, row = row, row + 1
                buffer[slot] = dev[o.index]
                fraction = 1.0
            elif o.verdict.decision is Decision.REGIONS:
                own = tuple(Placement(n_full + c, x, y, r) for (c, x, y, r) in placements[id(o)])
                for p in own:
                    r = p.region
                    buffer[p.slot, :, p.y : p.y + r.y2 - r.y1, p.x : p.x + r.x2 - r.x1] = \
                        dev[o.index, :, r.y1 : r.y2, r.x1 : r.x2]
                fraction = sum(r.area for r in o.verdict.regions) / max(content_rect(o.lb).area, 1)
            h2d = o.uploaded or len(o.frame.jpeg or b"")
            items.append(Prepared(o.frame, o.verdict, slot, own, o.lb, o.offset, o.w, o.h, o.w * o.h * 3,
                                  decode_s, fraction, None, h2d))
        return n_full + canvases, items
