"""The GPU pipeline: three stages on three CUDA streams, ordered by CUDA events, on buffers allocated once.

    stage 1 (decode stream): pinned staging -> one H2D of the JPEG bytes -> GPU decode -> letterbox/normalize
                             into the slot's input (+ luma signatures); event "decoded"
    stage 2 (infer stream):  waits for "decoded" on the device, runs the engine in place; event "inferred"
    stage 3 (post stream):   waits for "inferred", box decode + NMS, D2H of the kept boxes only -> FrameResults

A slot holds everything one batch needs on the device (input, raw output, signatures) plus its pinned staging;
``depth`` slots exist, so at most ``depth`` batches are in flight and ``submit`` blocks (counted) when the GPU
falls behind. Each stage runs on its own thread; the threads wait on the host only where a result is needed
(the engine's end, the D2H of the boxes), and CuPy, DALI, nvImageCodec and onnxruntime release the GIL there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np

from daemon.decode.jpeg import DecodeError, jpeg_size
from daemon.gpu.kernels import Decoded, LetterboxBatch, LumaKernel, PinnedStaging
from daemon.gpu.postprocess import GpuPostprocessor
from daemon.inference.model import LoadedModel
from daemon.inference.yolo import to_detections
from daemon.types import Frame, FrameError, FrameResult, StageTimes

log = logging.getLogger(__name__)

POLL_S = 0.1
_DONE = object()


class GpuDecoder(Protocol):
    name: str
    size: int
    max_batch: int
    dtype: Any

    def decode_into(self, jpegs: Sequence[bytes], out: Any, sig: Any | None, stream: Any,
                    staging: PinnedStaging | None = None) -> Decoded: ...


class DeviceEngine(Protocol):
    model: LoadedModel
    max_batch: int
    name: str
    input_dtype: Any
    output_dtype: Any

    def output_shape(self, n: int) -> tuple[int, ...]: ...

    def infer_into(self, x: Any, out: Any) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class GpuStreams:
    """The three stage streams. Build the engine with ``infer`` (onnxruntime's user_compute_stream)."""

    decode: Any
    infer: Any
    post: Any

    @staticmethod
    def create(device_id: int = 0) -> GpuStreams:
        import cupy

        with cupy.cuda.Device(device_id):
            return GpuStreams(*(cupy.cuda.Stream(non_blocking=True) for _ in range(3)))


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    max_batch: int
    depth: int = 3  # batches in flight = slots
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    staging_bytes_per_frame: int = 512 * 1024
    signatures: bool = True
    device_id: int = 0
    max_pixels: int = 40_000_000  # JPEG headers declaring more are refused before decoding (decompression bombs)


@dataclass(frozen=True, slots=True)
class PipelineCounters:
    batches: int
    frames: int
    errors: int
    backpressure_waits: int  # submits that found every slot busy
    backpressure_s: float  # time submit spent blocked
    bytes_h2d: int
    bytes_d2h: int
    busy_s: tuple[float, float, float]  # decode, infer, post: time each stage thread spent working


@dataclass(slots=True)
class _Slot:
    index: int
    input: Any
    raw: Any
    sig: Any
    staging: PinnedStaging
    decoded_ev: Any
    inferred_ev: Any
    frames: list[Frame] = field(default_factory=list)
    decoded: Decoded | None = None
    errors: list[FrameError] = field(default_factory=list)
    formed: float = 0.0
    decode_s: float = 0.0
    infer_s: float = 0.0

    @property
    def rows(self) -> int:
        return 0 if self.decoded is None else len(self.decoded.rows)


class GpuPipeline:
    def __init__(self, decoder: GpuDecoder, engine: DeviceEngine, post: GpuPostprocessor, streams: GpuStreams,
                 options: PipelineOptions, on_result: Callable[[FrameResult], None],
                 on_error: Callable[[FrameError], None] | None = None,
                 on_signatures: Callable[[Sequence[Frame], Any, Any], None] | None = None) -> None:
        import cupy

        if options.max_batch > min(decoder.max_batch, engine.max_batch) or options.depth < 1:
            raise ValueError(f"max_batch {options.max_batch} exceeds the decoder's {decoder.max_batch} or the "
                             f"engine's {engine.max_batch}, or depth {options.depth} < 1")
        if np.dtype(decoder.dtype) != np.dtype(engine.input_dtype):
            raise ValueError(f"decoder writes {np.dtype(decoder.dtype).name} but {engine.name} reads "
                             f"{np.dtype(engine.input_dtype).name}")
        self._cp = cupy
        self._dec, self._engine, self._post, self._streams, self._opts = decoder, engine, post, streams, options
        self._on_result, self._on_error, self._on_sigs = on_result, on_error, on_signatures
        self._names = engine.model.class_names
        self._pixels = LetterboxBatch(decoder.dtype, options.max_batch)
        self._luma = LumaKernel(decoder.dtype)
        self._conf = np.full(options.max_batch, options.conf, np.float32)
        self._iou = np.full(options.max_batch, options.iou, np.float32)
        self._free: queue.Queue[_Slot] = queue.Queue()
        for i in range(options.depth):
            self._free.put(self._slot(i))
        self._inbox: queue.Queue[object] = queue.Queue(maxsize=options.depth)
        self._to_infer: queue.Queue[object] = queue.Queue()
        self._to_post: queue.Queue[object] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self.failed: str | None = None
        self._n = {"batches": 0, "frames": 0, "errors": 0, "waits": 0, "h2d": 0}
        self._wait_s = 0.0
        self._busy = [0.0, 0.0, 0.0]

    def _slot(self, i: int) -> _Slot:
        cp, o = self._cp, self._opts
        size = self._dec.size
        with cp.cuda.Device(o.device_id):
            cells = size // 8
            return _Slot(i, cp.zeros((o.max_batch, 3, size, size), self._dec.dtype),
                         cp.zeros(self._engine.output_shape(o.max_batch), self._engine.output_dtype),
                         cp.zeros((o.max_batch, cells, cells), cp.uint8),
                         PinnedStaging(o.max_batch * o.staging_bytes_per_frame),
                         cp.cuda.Event(disable_timing=True), cp.cuda.Event(disable_timing=True))

    # -- public ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        for name, loop in (("decode", self._decode_loop), ("infer", self._infer_loop), ("post", self._post_loop)):
            t = threading.Thread(target=self._guard, args=(name, loop), name=f"gpu:{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def submit(self, frames: Sequence[Frame], timeout: float | None = None) -> bool:
        """Queue one batch (<= max_batch frames); blocks while ``depth`` batches are in flight (backpressure,
        counted). False when the pipeline is closed or ``timeout`` passed."""
        if len(frames) > self._opts.max_batch:
            raise ValueError(f"batch of {len(frames)} frames exceeds max_batch {self._opts.max_batch}")
        if self.failed:
            raise RuntimeError(f"GPU pipeline failed: {self.failed}")
        item = (list(frames), time.monotonic())
        try:
            self._inbox.put_nowait(item)
            return True
        except queue.Full:
            pass
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        with self._lock:
            self._n["waits"] += 1
        try:
            while not self._closed and not self.failed:
                try:
                    self._inbox.put(item, timeout=POLL_S)
                    return True
                except queue.Full:
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
            return False
        finally:
            with self._lock:
                self._wait_s += time.monotonic() - t0

    def stop(self, timeout: float = 10.0) -> bool:
        """Finish what was submitted, then end the stage threads; False if one did not end in time."""
        if not self._closed:
            self._closed = True
            self._put(self._inbox, _DONE)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def counters(self) -> PipelineCounters:
        with self._lock:
            n = dict(self._n)
            wait_s, busy = self._wait_s, (self._busy[0], self._busy[1], self._busy[2])
        return PipelineCounters(n["batches"], n["frames"], n["errors"], n["waits"], wait_s,
                                n["h2d"] + self._post.bytes_h2d, self._post.bytes_d2h, busy)

    # -- stages ---------------------------------------------------------------------------------------------
    def _guard(self, name: str, loop: Callable[[], None]) -> None:
        self._cp.cuda.Device(self._opts.device_id).use()
        try:
            loop()
        except Exception as exc:
            self.failed = f"stage {name}: {type(exc).__name__}: {exc}"
            log.exception("GPU pipeline stage %s failed", name)
            nxt = {"decode": self._to_infer, "infer": self._to_post}.get(name)
            if nxt is not None:
                nxt.put(_DONE)

    def _put(self, q: queue.Queue[object], item: object) -> None:
        while True:
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                if self.failed:
                    return

    def _decode_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is _DONE:
                break
            frames, formed = cast("tuple[list[Frame], float]", item)
            slot = self._free.get()
            t0 = time.perf_counter()
            slot.frames, slot.formed, slot.errors = frames, formed, []
            slot.decoded = self._decode(slot)
            slot.decoded_ev.record(self._streams.decode)
            if self._on_sigs is not None and self._opts.signatures and slot.rows:
                self._on_sigs([slot.frames[r] for r in slot.decoded.rows], slot.sig[: slot.rows],
                              self._streams.decode)
            slot.decode_s = time.perf_counter() - t0
            self._add_busy(0, slot.decode_s)
            self._to_infer.put(slot)
        self._to_infer.put(_DONE)

    def _decode(self, slot: _Slot) -> Decoded:
        """JPEG frames through the GPU decoder (a failing batch is retried frame by frame to find the bad one),
        then raw-pixel frames through the letterbox kernel; rows refer to ``slot.frames``."""
        s, sig = self._streams.decode, slot.sig if self._opts.signatures else None
        jpeg_idx = []
        for i, f in enumerate(slot.frames):
            if f.jpeg is None:
                continue
            try:
                check_jpeg(f.jpeg, self._opts.max_pixels)
                jpeg_idx.append(i)
            except DecodeError as exc:
                slot.errors.append(FrameError(f.camera, f.seq, exc.kind, str(exc)))
        jpegs = [slot.frames[i].jpeg or b"" for i in jpeg_idx]
        try:
            d = self._dec.decode_into(jpegs, slot.input, sig, s, slot.staging)
        except Exception as exc:
            log.debug("GPU decode of a batch failed (%s); decoding frame by frame", exc)
            d = self._one_by_one(jpegs, slot, sig)
        out = Decoded(d.letterboxes, [jpeg_idx[r] for r in d.rows], [(jpeg_idx[i], m) for i, m in d.failed],
                      d.bytes_h2d, d.keepalive)
        pix_idx = [i for i, f in enumerate(slot.frames) if f.jpeg is None and f.pixels is not None]
        if pix_idx:
            self._upload_pixels(slot, out, pix_idx, sig is not None)
        for i, why in out.failed:
            f = slot.frames[i]
            slot.errors.append(FrameError(f.camera, f.seq, "corrupt", f"GPU decoder rejected it: {why}"))
        with self._lock:
            self._n["h2d"] += out.bytes_h2d
        return out

    def _upload_pixels(self, slot: _Slot, out: Decoded, pix_idx: list[int], signatures: bool) -> None:
        """Raw BGR frames (sources that decode themselves): uint8 upload, then the fused letterbox kernel."""
        s = self._streams.decode
        with s:
            imgs = [self._cp.asarray(slot.frames[i].pixels) for i in pix_idx]
        base = len(out.rows)
        lbs, table = self._pixels(imgs, self._dec.size, slot.input[base:], s, bgr=True)
        out.letterboxes += lbs
        out.rows += pix_idx
        out.bytes_h2d += table + sum(int(i.nbytes) for i in imgs)
        out.keepalive.append(imgs)
        if signatures:
            self._luma(slot.input[base:], len(pix_idx), slot.sig[base:], s)

    def _one_by_one(self, jpegs: Sequence[bytes], slot: _Slot, sig: Any | None) -> Decoded:
        out = Decoded([], [])
        for i, data in enumerate(jpegs):
            r = len(out.rows)
            try:
                d = self._dec.decode_into([data], slot.input[r:], None if sig is None else sig[r:],
                                          self._streams.decode, None)
            except (DecodeError, RuntimeError, ValueError) as exc:
                out.failed.append((i, str(exc)))
                continue
            if d.failed:
                out.failed.append((i, d.failed[0][1]))
                continue
            out.letterboxes += d.letterboxes
            out.rows.append(i)
            out.bytes_h2d += d.bytes_h2d
            out.keepalive.append(d.keepalive)
        return out

    def _infer_loop(self) -> None:
        while True:
            slot = self._to_infer.get()
            if not isinstance(slot, _Slot):
                break
            t0 = time.perf_counter()
            n = slot.rows
            if n:
                self._streams.infer.wait_event(slot.decoded_ev)
                self._engine.infer_into(slot.input[:n], slot.raw[:n])
            slot.inferred_ev.record(self._streams.infer)
            slot.infer_s = time.perf_counter() - t0
            self._add_busy(1, slot.infer_s)
            self._to_post.put(slot)
        self._to_post.put(_DONE)

    def _post_loop(self) -> None:
        while True:
            slot = self._to_post.get()
            if not isinstance(slot, _Slot):
                break
            t0 = time.perf_counter()
            try:
                self._finish(slot)
            finally:
                slot.decoded = None  # drops the decoder's buffers and staging views (keepalive)
                slot.frames = []
                self._free.put(slot)
                self._add_busy(2, time.perf_counter() - t0)

    def _finish(self, slot: _Slot) -> None:
        decoded = slot.decoded
        if self._on_error is not None:
            for err in slot.errors:
                self._on_error(err)
        n = slot.rows
        if decoded is not None and n:
            d2h_before = self._post.bytes_d2h
            self._streams.post.wait_event(slot.inferred_ev)
            boxes = self._post(slot.raw[:n], self._conf, self._iou, stream=self._streams.post)
            d2h = (self._post.bytes_d2h - d2h_before) / n
            frames = [slot.frames[i] for i in decoded.rows]
            extra = max(decoded.bytes_h2d - sum(f.bytes_in for f in frames), 0) / n  # tables, failed frames
            for f, lb, arr in zip(frames, decoded.letterboxes, boxes, strict=True):
                t = time.perf_counter()
                dets = to_detections(arr, lb, self._names)
                times = StageTimes(queue=max(0.0, slot.formed - f.capture_mono), decode=slot.decode_s / n,
                                   infer=slot.infer_s / n, post=time.perf_counter() - t)
                self._on_result(FrameResult(
                    camera=f.camera, seq=f.seq, capture_time=f.capture_time, capture_mono=f.capture_mono,
                    width=lb.src_w, height=lb.src_h, detections=dets, bytes_in=f.bytes_in,
                    bytes_decoded=lb.src_w * lb.src_h * 3, times=times, bytes_h2d=f.bytes_in + round(extra),
                    bytes_d2h=round(d2h)))
        with self._lock:
            self._n["batches"] += 1
            self._n["frames"] += n
            self._n["errors"] += len(slot.errors)

    def _add_busy(self, stage: int, seconds: float) -> None:
        with self._lock:
            self._busy[stage] += seconds


def check_jpeg(data: bytes, max_pixels: int) -> None:
    """The host-side checks of the CPU path before a JPEG goes to the GPU decoder: a readable header, a size
    within ``max_pixels``, and an EOI marker at the end (truncated frames are refused). Raises DecodeError."""
    w, h = jpeg_size(data)
    if w * h > max_pixels:
        raise DecodeError("too_large", f"JPEG of {w}x{h} = {w * h} px exceeds max_pixels {max_pixels}")
    if not data[-4096:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise DecodeError("corrupt", f"truncated JPEG ({len(data)} bytes): no EOI marker at the end")


def make_decoder(name: str, size: int, max_batch: int, dtype: Any, device_id: int = 0) -> GpuDecoder:
    """The GPU JPEG decoder ``name`` (dali | nvimgcodec; Capabilities.decoder says which is installed)."""
    if name == "dali":
        from daemon.gpu.dali_decode import DaliDecoder

        return DaliDecoder(size, max_batch, device_id, dtype=dtype)
    if name == "nvimgcodec":
        from daemon.gpu.nvimgcodec_decode import NvImgCodecDecoder

        return NvImgCodecDecoder(size, max_batch, device_id, dtype=dtype)
    raise ValueError(f"GPU decoder must be dali or nvimgcodec, got {name!r}")
