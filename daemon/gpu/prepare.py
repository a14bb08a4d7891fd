"""GPU stage 1 for the runner: JPEG bytes -> pinned staging -> one H2D copy of the compressed bytes -> GPU decode
(nvImageCodec or DALI) -> letterboxed model input written straight into the batch buffer, with delta caching's
luma signatures computed on the device (1/64 of the luma; it comes to the host only when delta caching is on).

Everything is issued on the calling thread's current CUDA stream (the runner's "pre" stream); nothing is waited
for on the host except the signatures of delta-cached cameras. Each batch buffer has its own pinned staging and
scratch, reused only when the buffer comes round again, i.e. after the engine has read it.

Without delta caching (and without ROI/mask) every decoded frame is a FULL row: the decoder writes the buffer's
rows directly, no device copy. With delta caching the batch is decoded into the buffer's scratch, then FULL
frames are copied to their rows and REGIONS crops are packed onto shared canvases; SKIP frames cost no row.
Frames with a ROI or mask, and raw-pixel frames, are letterboxed on the host and uploaded (counted).
H.264/H.265 packet frames (``Frame.packet``) are decoded by their camera's NVDEC decoder (daemon.gpu.nvdec) and
letterboxed from NV12 (with the stream's colour tags) into rows after the JPEG rows; the packet bytes are what they
cost host-to-device. A camera's end of stream flushes its decoder; pictures that find no row in the batch (a flush
gives several at once) are copied off the decoder and take the next batch's first rows (``PreparedBatch.owed``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from daemon.decode.jpeg import DecodeError, decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.delta.policy import Decision, Verdict
from daemon.delta.tracker import DeltaTracker, content_rect
from daemon.gpu.changemap import GpuChangeMaps
from daemon.gpu.decoders import GpuDecoder, check_jpeg
from daemon.gpu.kernels import SIGNATURE_FACTOR, Decoded, LumaKernel, PinnedStaging
from daemon.pipeline.prepare import PAD_VALUE, Placement, Prepared, PreparedBatch, apply_roi_and_mask, fit_regions
from daemon.pipeline.settings import CameraSettings
from daemon.types import EndOfStream, Frame, FrameError, Letterbox

log = logging.getLogger(__name__)
T = TypeVar("T")

OFF = Verdict(Decision.FULL, "delta off")


@dataclass(slots=True)
class DecodedRow:
    """A frame decoded into a row of the batch's decoded rows (the buffer itself, or its scratch)."""

    frame: Frame
    lb: Letterbox
    w: int  # source frame size (a ROI's letterbox covers part of it)
    h: int
    verdict: Verdict
    index: int  # row in the decoded batch (the buffer itself, or its scratch)
    offset: tuple[int, int] = (0, 0)  # ROI origin (host-decoded frames only)
    uploaded: int = 0  # bytes of a host-letterboxed tensor sent to the device instead of JPEG bytes


@dataclass(slots=True)
class _PerBuffer:
    """What one batch buffer owns besides itself; reused only after the engine has read that buffer."""

    staging: PinnedStaging
    sig: Any
    scratch: Any = None
    keepalive: list[Any] = field(default_factory=list)


class GpuPreparer:
    def __init__(self, decoder: GpuDecoder, max_pixels: int, max_jpeg_bytes: int,
                 delta: DeltaTracker | None = None, clock: Callable[[], float] = time.monotonic,
                 staging_bytes_per_frame: int = 512 * 1024, device_id: int = 0,
                 features: Callable[[str], bool] | None = None) -> None:
        self._features = features  # cameras in delta.mode features: their FULL/REGIONS frames take whole rows last
        self._dec = decoder
        self._size = decoder.size
        self._max_pixels = max_pixels
        self._max_jpeg_bytes = max_jpeg_bytes
        self._delta = delta
        self._clock = clock
        self._staging_bytes = staging_bytes_per_frame
        self._per: dict[int, _PerBuffer] = {}
        self._luma = LumaKernel(decoder.dtype)
        self._device = device_id
        self._forget: set[str] = set()
        self._forget_lock = threading.Lock()
        import cupy

        with cupy.cuda.Device(device_id):  # the references live on this runtime's GPU whatever thread builds it
            self._maps = GpuChangeMaps(self._size // SIGNATURE_FACTOR, SIGNATURE_FACTOR)
        self._epochs: dict[str, int] = {}  # camera -> the tracker's reference epoch its device reference mirrors
        self.changemap_host_s = 0.0  # host wall time issuing and waiting for the change maps (GIL waits included)
        self.changemap_frames = 0
        self._last_round: tuple[Any, list[DecodedRow], list[int]] | None = None  # (signatures, rows, cells/tile)
        self.bytes_h2d = 0
        self._nvdec: Any = None  # daemon.gpu.nvdec.NvdecPool, made at the first packet frame
        self._nv12: Any = None  # daemon.gpu.nv12_kernel.Nv12Letterbox
        self._owed: list[Any] = []  # daemon.gpu.nvdec.Picture copies that found no row yet, in order
        self._roi_warned: set[str] = set()  # packet cameras that got a ROI/mask at run time (warned once)
        self._crop_copy: CropCopy | None = None

    @property
    def changemap_s(self) -> float:
        """Device time of the change maps so far (bench, probe): CUDA events around their uploads and kernels."""
        return self._maps.device_s

    def changemap_device_cost(self, repeats: int = 200) -> tuple[float, int] | None:
        """(device seconds per frame, frames) of the change maps of the last round scored on the device with its
        most common tile size, replayed as a CUDA graph (GpuChangeMaps.device_cost); None before any such round.
        Call with the runtime stopped: it reads the last batch's signature buffer."""
        last = self._last_round
        if last is None:
            return None
        sig, rows, cpts = last
        cpt = max(set(cpts), key=cpts.count)
        keep = [o for o, c in zip(rows, cpts, strict=True) if c == cpt]
        import cupy

        with cupy.cuda.Device(self._device):
            cost = self._maps.device_cost(sig, [o.index for o in keep], [o.frame.camera for o in keep], cpt, repeats)
        return cost, len(keep)

    def prepare(self, frames: Sequence[Frame], buffer: Any, settings_of: Callable[[str], CameraSettings | None],
                ends: Sequence[EndOfStream] = ()) -> PreparedBatch:
        """``ends``: cameras whose stream ended with this batch; their NVDEC decoders' last pictures are added."""
        import cupy

        t0 = time.perf_counter()
        with self._forget_lock:
            gone, self._forget = self._forget, set()
        for cam in gone:
            self._drop(cam)
        stream = cupy.cuda.get_current_stream()
        per = self._buffers(buffer)
        errors: list[FrameError] = []
        jpeg_frames: list[Frame] = []
        packet_frames: list[Frame] = []
        host_frames: list[tuple[Frame, NDArray[np.uint8], CameraSettings | None]] = []
        delta_on = False
        for f in frames:
            settings = settings_of(f.camera)
            if f.packet is not None:
                if settings is not None and (settings.roi is not None or settings.mask) \
                        and f.camera not in self._roi_warned:
                    self._roi_warned.add(f.camera)
                    log.warning("camera %s: its ROI/mask is not applied to NVDEC-decoded frames; restart the camera "
                                "(or the daemon) after adding one so its video is decoded on the CPU", f.camera)
                packet_frames.append(f)
                delta_on = delta_on or (self._delta is not None and self._delta.enabled(f.camera))
                continue
            try:
                if f.pixels is not None or (settings is not None and (settings.roi is not None or settings.mask)):
                    px = self._host_pixels(f)
                    host_frames.append((f, px, settings))
                    continue
                self._check(f)
            except DecodeError as exc:
                errors.append(FrameError(f.camera, f.seq, exc.kind, str(exc)))
                continue
            jpeg_frames.append(f)
            delta_on = delta_on or (self._delta is not None and self._delta.enabled(f.camera))
        direct = not delta_on and not host_frames
        target = buffer if direct else self._scratch(per, buffer)
        ok = self._decode(jpeg_frames, target, per, stream, errors)
        if packet_frames or self._owed or (ends and self._nvdec is not None):
            ok += self._decode_packets(packet_frames, ends, target, len(ok), stream, errors)
        for f, px, settings in host_frames:
            view, offset = apply_roi_and_mask(px, settings)
            host = np.empty((3, self._size, self._size), np.float32)
            lb = letterbox_into(view, self._size, host)
            row = len(ok)
            target[row] = cupy.asarray(host, dtype=target.dtype)
            self.bytes_h2d += int(target[row].nbytes)
            per.keepalive.append(host)
            ok.append(DecodedRow(f, lb, px.shape[1], px.shape[0], OFF, row, offset, int(target[row].nbytes)))
        if self._delta is not None and delta_on and ok:
            self._plan(self._delta, ok, target, per, stream)
        decode_s = (time.perf_counter() - t0) / max(len(frames), 1)
        if direct:
            items = [_item(o, o.index, (), 1.0, decode_s) for o in ok]
            return PreparedBatch(buffer, len(ok), tuple(items), tuple(errors), owed=len(self._owed))
        rows, items, feature_rows = self._fill(ok, target, buffer, decode_s)
        return PreparedBatch(buffer, rows + feature_rows, tuple(items), tuple(errors), feature_rows, len(self._owed))

    def close(self) -> None:
        """After the runner stopped: wait for the device, then drop what the decoder may still read (the
        decoder's buffers, staging views) before the pinned staging itself."""
        import cupy

        with cupy.cuda.Device(self._device):
            cupy.cuda.runtime.deviceSynchronize()
        for per in self._per.values():
            per.keepalive.clear()
        if self._nvdec is not None:
            self._nvdec.close()
        close = getattr(self._dec, "close", None)
        if close is not None:
            close()
        self._per.clear()

    # -- pieces ---------------------------------------------------------------------------------------------
    def _buffers(self, buffer: Any) -> _PerBuffer:
        import cupy

        per = self._per.get(id(buffer))
        if per is None:
            cells = self._size // SIGNATURE_FACTOR
            per = _PerBuffer(PinnedStaging(int(buffer.shape[0]) * self._staging_bytes),
                             cupy.zeros((int(buffer.shape[0]), cells, cells), cupy.uint8))
            self._per[id(buffer)] = per
        per.keepalive = []  # the previous batch of this buffer is done on the device (the engine read it)
        return per

    @staticmethod
    def _scratch(per: _PerBuffer, buffer: Any) -> Any:
        import cupy

        if per.scratch is None:
            per.scratch = cupy.empty_like(buffer)
        return per.scratch

    def _host_pixels(self, f: Frame) -> NDArray[np.uint8]:
        if f.pixels is not None:
            if f.pixels.ndim != 3 or f.pixels.shape[2] != 3 or f.pixels.dtype != np.uint8:
                raise DecodeError("corrupt", f"raw frame must be HxWx3 uint8, got {f.pixels.shape}")
            return f.pixels
        return decode_jpeg(self._check(f), self._max_pixels)

    def _check(self, f: Frame) -> bytes:
        data = f.jpeg or b""
        if len(data) > self._max_jpeg_bytes:
            raise DecodeError("too_large", f"JPEG of {len(data)} bytes exceeds {self._max_jpeg_bytes}")
        check_jpeg(data, self._max_pixels)
        return data

    def _decode(self, frames: list[Frame], out: Any, per: _PerBuffer, stream: Any,
                errors: list[FrameError]) -> list[DecodedRow]:
        """All JPEG frames in one decoder call; a batch the decoder refuses as a whole (DALI fails the batch for
        one bad frame) is decoded frame by frame to find the bad one."""
        if not frames:
            return []
        jpegs = [f.jpeg or b"" for f in frames]
        sig = None  # signatures, when needed, are computed over every row afterwards (_plan)
        try:
            d = self._dec.decode_into(jpegs, out, sig, stream, per.staging)
        except Exception as exc:
            log.debug("GPU decode of a batch failed (%s); decoding frame by frame", exc)
            d = self._one_by_one(jpegs, out, sig, stream)
        per.keepalive.append(d.keepalive)
        self.bytes_h2d += d.bytes_h2d
        for i, why in d.failed:
            f = frames[i]
            errors.append(FrameError(f.camera, f.seq, "corrupt", f"GPU decoder rejected it: {why}"))
        return [DecodedRow(frames[i], lb, lb.src_w, lb.src_h, OFF, row)
                for row, (i, lb) in enumerate(zip(d.rows, d.letterboxes, strict=True))]

    def _decode_packets(self, frames: list[Frame], ends: Sequence[EndOfStream], out: Any, first_row: int,
                        stream: Any, errors: list[FrameError]) -> list[DecodedRow]:
        """Pictures owed from the last batch, then packet frames through their cameras' NVDEC decoders, in order,
        then the last pictures of the cameras in ``ends``; each picture letterboxed into the next row at once (a
        picture is valid only until its decoder's next call), or copied off to wait for the next batch when no row
        is left. Decode-only packets (fps cap) and packets without a picture yet take no row."""
        if self._nvdec is None:
            from daemon.gpu.nv12_kernel import Nv12Letterbox
            from daemon.gpu.nvdec import NvdecPool

            self._nvdec = NvdecPool(self._device)
            self._nv12 = Nv12Letterbox(self._dec.dtype)
        pool = self._nvdec
        ok: list[DecodedRow] = []
        pool.begin(stream)  # the pool's stream: the rows are free (the engine read them) before they are written
        try:
            owed, self._owed = self._owed, []
            self._rows(owed, out, first_row, ok, errors)
            for f in frames:
                try:  # a decoder that cannot be made (profile, sessions, memory) fails this camera's frame only
                    pictures, errs = pool.decode(f)
                except Exception as exc:
                    log.warning("camera %s: NVDEC failed on frame %d: %s", f.camera, f.seq, exc)
                    pool.forget(f.camera)
                    errors.append(FrameError(f.camera, f.seq, "corrupt", f"NVDEC could not decode it: {exc}"))
                    continue
                errors += errs
                self.bytes_h2d += len(f.packet.data) if f.packet is not None else 0
                self._rows(pictures, out, first_row, ok, errors)
            for eos in ends:
                pictures, errs = pool.flush(eos.camera)
                errors += errs
                self._rows(pictures, out, first_row, ok, errors)
        finally:
            pool.end(stream)  # and the rest of the batch's work runs after them
        return ok

    def _rows(self, pictures: list[Any], out: Any, first_row: int, ok: list[DecodedRow],
              errors: list[FrameError]) -> None:
        """Each picture (daemon.gpu.nvdec.Picture) into the next free row of ``out`` (appended to ``ok``); with
        no row left, a copy of it (on the pool's stream, before its decoder runs again) is owed to the next batch."""
        from daemon.gpu.nv12_kernel import yuv_coefficients

        pool = self._nvdec
        for pic in pictures:
            packet = pic.frame.packet
            if packet is None or packet.decode_only:
                continue
            row = first_row + len(ok)
            if row >= int(out.shape[0]):
                with pool.stream:
                    self._owed.append(replace(pic, nv12=pic.nv12.copy(), owner=None))
                continue
            try:  # e.g. a 10-bit or odd-sized surface the NV12 kernel does not take
                lb = self._nv12(pic.nv12, pic.width, pic.height, out[row], pool.stream,
                                yuv_coefficients(packet.colorspace, packet.full_range))
            except ValueError as exc:
                errors.append(FrameError(pic.frame.camera, pic.frame.seq, "corrupt", f"NVDEC picture unusable: {exc}"))
                continue
            ok.append(DecodedRow(pic.frame, lb, pic.width, pic.height, OFF, row, uploaded=len(packet.data)))

    def _one_by_one(self, jpegs: Sequence[bytes], out: Any, sig: Any | None, stream: Any) -> Decoded:
        d = Decoded([], [])
        for i, data in enumerate(jpegs):
            r = len(d.rows)
            try:
                one = self._dec.decode_into([data], out[r:], None if sig is None else sig[r:], stream, None)
            except (DecodeError, RuntimeError, ValueError) as exc:
                d.failed.append((i, str(exc)))
                continue
            if one.failed:
                d.failed.append((i, one.failed[0][1]))
                continue
            d.letterboxes += one.letterboxes
            d.rows.append(i)
            d.bytes_h2d += one.bytes_h2d
            d.keepalive.append(one.keepalive)
        return d

    def _plan(self, delta: DeltaTracker, ok: list[DecodedRow], target: Any, per: _PerBuffer, stream: Any) -> None:
        """The delta decisions. Signatures of every row on the device; the host gets them (the tracker keeps its
        reference for exports) and, for cameras whose reference is mirrored on the device, the change maps
        computed there in one batch. A camera with several frames in the batch is planned frame after frame
        (one round per frame of it), so each frame is scored against the reference its predecessor left."""
        import cupy

        self._luma(target, len(ok), per.sig, stream)
        sigs = cupy.asnumpy(per.sig[: len(ok)], stream=stream)
        stream.synchronize()  # decoding and signatures done: what is timed below is the change maps alone
        enabled = {cam: delta.enabled(cam) for cam in {o.frame.camera for o in ok}}  # once a camera, not a frame
        for cam, on in enabled.items():
            if not on:
                self._forget_reference(cam)  # delta off for it (now): its device reference goes, its decoder stays
        # rounds of at most one frame per camera: one reference update per slot per launch, in frame order
        for group in planning_rounds([o for o in ok if enabled[o.frame.camera]], lambda o: o.frame.camera):
            self._plan_round(delta, group, sigs, per, stream)

    def _plan_round(self, delta: DeltaTracker, group: list[DecodedRow], sigs: NDArray[np.uint8], per: _PerBuffer,
                    stream: Any) -> None:
        on_device = [o for o in group if self._maps.has(o.frame.camera)
                     and self._epochs.get(o.frame.camera) == delta.reference_epoch(o.frame.camera)]
        cpts = [delta.cells_per_tile(o.frame.camera) for o in on_device]
        t0 = time.perf_counter()
        scored = self._maps.scores(per.sig, [o.index for o in on_device], [o.frame.camera for o in on_device],
                                   cpts, stream)
        self.changemap_host_s += time.perf_counter() - t0
        self.changemap_frames += len(on_device)
        if on_device and (self._last_round is None or len(on_device) >= len(self._last_round[1])):
            self._last_round = (per.sig, on_device, cpts)  # the widest round so far (changemap_device_cost)
        by_row = {o.index: sc for o, sc in zip(on_device, scored, strict=True)}
        now = self._clock()
        cams = [o.frame.camera for o in group]
        if type(delta).plan is DeltaTracker.plan:  # the round at once (a subclass that hooks plan: frame by frame)
            verdicts = delta.plan_round(cams, [sigs[o.index] for o in group], [o.lb for o in group], now,
                                        [by_row.get(o.index) for o in group])
        else:
            verdicts = [delta.plan(c, sigs[o.index], o.lb, now, scores=by_row.get(o.index))
                        for c, o in zip(cams, group, strict=True)]
        follow: list[DecodedRow] = []
        for o, cam, v in zip(group, cams, verdicts, strict=True):
            o.verdict = v
            if o.index in by_row:
                follow.append(o)
                continue
            ref, epoch = delta.reference_state(cam)  # not (or no longer) mirrored: the host's reference goes up
            if ref is not None:
                self._maps.upload(cam, ref)
                self._epochs[cam] = epoch
        self._maps.follow(per.sig, [o.index for o in follow], [o.frame.camera for o in follow],
                          [o.verdict for o in follow], stream)

    def forget(self, camera: str) -> None:
        """The camera left (any thread): its device reference slot is freed before the next batch."""
        with self._forget_lock:
            self._forget.add(camera)

    def _drop(self, camera: str) -> None:
        """The camera left: its device reference, its NVDEC decoder and any picture of it still owed go."""
        self._forget_reference(camera)
        self._owed = [p for p in self._owed if p.frame.camera != camera]
        if self._nvdec is not None:
            self._nvdec.forget(camera)

    def _forget_reference(self, camera: str) -> None:
        self._maps.forget(camera)
        self._epochs.pop(camera, None)

    def _fill(self, ok: list[DecodedRow], dev: Any, buffer: Any, decode_s: float) -> tuple[int, list[Prepared], int]:
        """FULL rows, then the REGIONS canvases, then the features rows (the feature stage's: whole frames)."""
        lay = lay_out(ok, self._size, int(buffer.shape[0]), self._delta, self._features, decode_s)
        if lay.canvases:
            buffer[lay.n_full : lay.n_full + lay.canvases].fill(PAD_VALUE)
        for src, dst in lay.copies:
            buffer[dst] = dev[src]
        self._crops(dev, buffer, lay.crops)
        return lay.n_full + lay.canvases, lay.items, lay.feature_rows

    def _crops(self, src: Any, dst: Any, crops: list[tuple[int, int, int, int, int, int, int, int]]) -> None:
        """The REGIONS crops onto their canvases: one kernel launch for the batch (a slice copy each else)."""
        if not crops:
            return
        if self._crop_copy is None:
            self._crop_copy = CropCopy()
        if not self._crop_copy(src, dst, crops):
            for row, y1, x1, h, w, slot, y, x in crops:
                dst[slot, :, y : y + h, x : x + w] = src[row, :, y1 : y1 + h, x1 : x1 + w]


Crop = tuple[int, int, int, int, int, int, int, int]  # src row, y1, x1, h, w, dst row, y, x (CropCopy)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a batch's decoded frames go in the batch buffer; ``GpuPreparer._fill`` issues the device work."""

    items: list[Prepared]  # in ``ok`` order
    copies: list[tuple[int, int]]  # (decoded row, batch row): whole frames (FULL rows, then features rows)
    crops: list[Crop]  # REGIONS crops onto canvas rows (one CropCopy launch)
    n_full: int  # FULL rows [0, n_full), canvases [n_full, n_full + canvases), then the features rows
    canvases: int
    feature_rows: int


def lay_out(ok: Sequence[DecodedRow], size: int, capacity: int, delta: DeltaTracker | None,
            features: Callable[[str], bool] | None, decode_s: float) -> Layout:
    """The host side of a batch's fill: FULL rows, then the REGIONS canvases (fit_regions; a frame that finds
    no canvas room goes FULL), then the features rows (delta.mode features cameras: whole frames); the
    Prepared item of every frame."""
    feat_ids: set[int] = set() if features is None else \
        {id(o) for o in ok if o.verdict.decision is not Decision.SKIP and features(o.frame.camera)}
    rest = [o for o in ok if id(o) not in feat_ids] if feat_ids else ok
    placements, canvases, n_full = fit_regions(rest, size, capacity - len(feat_ids), delta)
    copies: list[tuple[int, int]] = []
    crops: list[Crop] = []
    items: list[Prepared] = []
    row = 0
    feat_row = n_full + canvases
    full, regions = Decision.FULL, Decision.REGIONS
    for o in ok:
        v = o.verdict
        if feat_ids and id(o) in feat_ids:
            copies.append((o.index, feat_row))
            items.append(_item(o, feat_row, (), 1.0 if v.decision is full else _fraction(v, o.lb), decode_s, True))
            feat_row += 1
        elif v.decision is full:
            copies.append((o.index, row))
            items.append(_item(o, row, (), 1.0, decode_s))
            row += 1
        elif v.decision is regions:
            mine = placements[id(o)]
            own = tuple([Placement(n_full + c, x, y, r) for (c, x, y, r) in mine])
            crops += [(o.index, r.y1, r.x1, r.y2 - r.y1, r.x2 - r.x1, n_full + c, y, x) for (c, x, y, r) in mine]
            items.append(_item(o, -1, own, _fraction(v, o.lb), decode_s))
        else:
            items.append(_item(o, -1, (), 0.0, decode_s))
    return Layout(items, copies, crops, n_full, canvases, len(feat_ids))


def _fraction(v: Verdict, lb: Letterbox) -> float:
    """The share of the frame's content pixels its regions cover."""
    return sum((r.x2 - r.x1) * (r.y2 - r.y1) for r in v.regions) / max(content_rect(lb).area, 1)


def _item(o: DecodedRow, slot: int, own: tuple[Placement, ...], fraction: float, decode_s: float,
          features: bool = False) -> Prepared:
    w, h = o.w, o.h
    h2d = o.uploaded or len(o.frame.jpeg or b"")
    return Prepared(o.frame, o.verdict, slot, own, o.lb, o.offset, w, h, w * h * 3, decode_s, fraction, None, h2d,
                    features)


def planning_rounds(items: Sequence[T], camera_of: Callable[[T], str]) -> list[list[T]]:
    """``items`` (in batch order) split into rounds holding at most one item of each camera, each camera's items
    in order over the rounds: round k holds the k-th frame of every camera that has one."""
    rounds: list[list[T]] = []
    seen: dict[str, int] = {}
    for item in items:
        cam = camera_of(item)
        k = seen.get(cam, 0)
        seen[cam] = k + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(item)
    return rounds


_CROPS = r"""
extern "C" __global__ void crops(const T* src, T* dst, const int* rects, int side) {
    // one block row per crop: rects[8k:8k+8] = src row, y1, x1, h, w, dst row, y, x; (n, 3, side, side) arrays
    const int* r = rects + 8 * blockIdx.y;
    int h = r[3], w = r[4];
    size_t plane = (size_t)side * side;
    const T* s = src + (size_t)r[0] * 3 * plane + (size_t)r[1] * side + r[2];
    T* d = dst + (size_t)r[5] * 3 * plane + (size_t)r[6] * side + r[7];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < 3 * h * w; i += gridDim.x * blockDim.x) {
        int c = i / (h * w), j = i - c * h * w, y = j / w, x = j - y * w;
        d[c * plane + (size_t)y * side + x] = s[c * plane + (size_t)y * side + x];
    }
}
"""


class CropCopy:
    """Copies many crops between (n, 3, S, S) C-contiguous device arrays of one dtype in one kernel launch, on
    the current stream: ``dst[row', :, y:y+h, x:x+w] = src[row, :, y1:y1+h, x1:x1+w]`` for each crop (same as the
    slice assignments, element for element: a copy of 2- or 4-byte elements)."""

    def __init__(self) -> None:
        import cupy

        self._cp = cupy
        self._kernels = {size: cupy.RawModule(code=_CROPS.replace("T*", f"{t}*")).get_function("crops")
                         for size, t in ((2, "unsigned short"), (4, "unsigned int"))}

    def __call__(self, src: Any, dst: Any, crops: Sequence[tuple[int, int, int, int, int, int, int, int]]) -> bool:
        """False (nothing done) where the arrays do not fit it."""
        cp = self._cp
        side = int(src.shape[-1])
        kernel = self._kernels.get(int(src.dtype.itemsize))
        if kernel is None or src.dtype != dst.dtype or src.ndim != 4 or src.shape[1:] != (3, side, side) \
                or dst.shape[1:] != src.shape[1:] or not (src.flags.c_contiguous and dst.flags.c_contiguous):
            return False
        table = cp.asarray(np.asarray(crops, np.int32).reshape(-1))
        kernel((16, len(crops)), (256,), (src, dst, table, np.int32(side)))
        return True
