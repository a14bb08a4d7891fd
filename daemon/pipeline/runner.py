"""The staged CPU pipeline: batcher+prepare -> inference -> post-processing, one thread each.

Stages hand work over through queues of depth 2, so decoding batch n+1 overlaps inference of batch n. Batch
buffers are allocated once and recycled. Stop drains: what was taken from the camera queues is finished and
published before the threads end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from daemon.delta.policy import Decision
from daemon.delta.tracker import DeltaTracker
from daemon.framequeue import FrameQueues, Item
from daemon.inference.engine import Engine
from daemon.inference.model import Layout
from daemon.inference.yolo import decode_output
from daemon.pipeline.heartbeat import Heartbeat
from daemon.pipeline.post import BatchDetections, source_regions
from daemon.pipeline.prepare import Prepared, PreparedBatch, Preparer
from daemon.pipeline.settings import SettingsBoard
from daemon.types import EndOfStream, Frame, FrameError, FrameResult, StageTimes

log = logging.getLogger(__name__)

_DONE = object()
POLL_S = 0.2
MAX_DET = 1000  # boxes per row from the decoder; cameras cut to their own max_detections


class StageSync(Protocol):
    """How the three stage threads order their device work. On the CPU nothing is needed (``NO_SYNC``); on the
    GPU each stage thread computes on its own CUDA stream, and an event recorded after a stage's work is what the
    next stage's stream waits on (daemon.gpu.streams.CudaStages): no host waits between stages."""

    def bind(self, stage: str) -> None: ...  # called once on the stage's thread before its loop

    def mark(self) -> Any: ...  # after a stage's work was issued: a token of its completion

    def wait(self, token: Any) -> None: ...  # the calling stage's later work runs after ``token``


class _NoSync:
    def bind(self, stage: str) -> None:
        return None

    def mark(self) -> Any:
        return None

    def wait(self, token: Any) -> None:
        return None


NO_SYNC: StageSync = _NoSync()


class FeatureRowsLike(Protocol):
    @property
    def raw(self) -> NDArray[np.float32]: ...

    @property
    def work(self) -> tuple[float, ...]: ...


class FeatureInfer(Protocol):
    """daemon.features.live.FeatureStage: the rows of delta.mode features cameras (host rows on the CPU path,
    device rows on the GPU path, whose raw output is then a device array too)."""

    def infer(self, rows: NDArray[np.float32], items: Sequence[Prepared]) -> FeatureRowsLike: ...


class ResultSink(Protocol):
    """Where the post stage hands results (the app fans them out to publishers, stats and previews)."""

    def on_result(self, result: FrameResult, image: NDArray[np.uint8] | None) -> None: ...

    def on_error(self, error: FrameError, bytes_in: int) -> None: ...

    def on_end(self, eos: EndOfStream) -> None: ...


@dataclass(frozen=True, slots=True)
class _Batch:
    batch: PreparedBatch
    formed_mono: float
    ends: tuple[EndOfStream, ...]
    ready: Any = None  # StageSync token: the batch tensor is written


@dataclass(frozen=True, slots=True)
class _Inferred:
    batch: PreparedBatch
    raw: Any
    infer_s: float
    formed_mono: float
    ends: tuple[EndOfStream, ...]
    ready: Any = None  # StageSync token: ``raw`` is written
    work: dict[int, float] | None = None  # features rows: their convolution work as a share of a full frame


def cpu_batch_decoder(raw: Any, layout: Layout, conf: NDArray[np.float32], iou: NDArray[np.float32],
                      max_det: int) -> list[NDArray[np.float32]]:
    """Boxes of every batch row on the CPU (numpy decode and NMS), each row with its own thresholds."""
    return [decode_output(raw[r : r + 1], layout, float(conf[r]), float(iou[r]), max_det=max_det)[0]
            for r in range(int(raw.shape[0]))]


def concat_rows(engine_rows: Any, feature_rows: Any) -> Any:
    """The engine's raw rows, then the feature stage's, where they are: numpy, or CuPy on the GPU path."""
    if hasattr(engine_rows, "__cuda_array_interface__"):
        import cupy

        return cupy.concatenate([engine_rows, cupy.asarray(feature_rows)])
    return np.concatenate([np.asarray(engine_rows), np.asarray(feature_rows)])


def host_buffer(shape: tuple[int, ...]) -> Any:
    return np.zeros(shape, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    max_batch: int
    max_wait_s: float
    buffers: int = 3
    allocate: Callable[[tuple[int, ...]], Any] = host_buffer  # batch buffers (numpy here, CuPy on the GPU)
    batch_decoder: Callable[[Any, Layout, NDArray[np.float32], NDArray[np.float32], int],
                            list[NDArray[np.float32]]] = cpu_batch_decoder
    d2h_bytes_per_box: int = 0  # what the row decoder copies to the host per box (GPU path)
    sync: StageSync = NO_SYNC
    # run every batch at max_batch rows (the extra rows' outputs are ignored). The GPU path does: onnxruntime's CUDA
    # EP re-plans every convolution when the input shape differs from the previous run's; on an H200
    # (tools/gpu_probe.py, 2026-11-28) batches alternating between 8, 16 and 32 rows took 931 ms a run against
    # 23 ms at a fixed 32, although each size alone runs in 4-10 ms.
    pad_to_batch: bool = False
    features: FeatureInfer | None = None  # delta.mode features


class PipelineRunner:
    def __init__(
        self,
        queues: FrameQueues,
        preparer: Preparer,
        engine: Engine,
        settings: SettingsBoard,
        sink: ResultSink,
        heartbeat: Heartbeat,
        options: RunnerOptions,
        delta: DeltaTracker | None = None,
    ) -> None:
        self._delta = delta
        self._queues = queues
        self._preparer = preparer
        self._engine = engine
        self._settings = settings
        self._sink = sink
        self._heartbeat = heartbeat
        self._opts = options
        self._names = engine.model.class_names
        self._layout = engine.model.layout
        h, w = engine.model.input_hw
        self._size = h
        self._free: queue.Queue[Any] = queue.Queue()
        for _ in range(options.buffers):
            self._free.put(options.allocate((options.max_batch, 3, h, w)))
        self._to_infer: queue.Queue[object] = queue.Queue(maxsize=2)
        self._to_post: queue.Queue[object] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.batches = 0
        self.stage_errors = 0
        self.dropped_boxes = 0  # decoded boxes with a NaN/inf value (a corrupt engine output), left out

    def start(self) -> None:
        for name, target in (("pre", self._pre_loop), ("infer", self._infer_loop), ("post", self._post_loop)):
            t = threading.Thread(target=self._guard, args=(name, target), name=f"pipeline:{name}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self, timeout: float) -> bool:
        """Stop taking frames, finish what is in flight, and join; False if a stage did not end in time."""
        self._stop.set()
        self._queues.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.error("pipeline stages did not stop within %.1f s: %s", timeout, alive)
        for stage in ("pre", "infer", "post"):
            self._heartbeat.forget(stage)
        return not alive

    # -- stages ---------------------------------------------------------------------------------------------
    def _guard(self, name: str, loop: object) -> None:
        try:
            self._opts.sync.bind(name)
            loop()  # type: ignore[operator]
        except Exception:
            self.stage_errors += 1
            log.exception("pipeline stage %s failed; the watchdog will see its heartbeat stop", name)

    def _pre_loop(self) -> None:
        while not self._stop.is_set():
            self._heartbeat.beat("pre")
            items = self._form_batch()
            if not items:
                continue
            frames = [i for i in items if isinstance(i, Frame)]
            ends = tuple(i for i in items if isinstance(i, EndOfStream))
            formed = time.monotonic()
            buffer = self._take_buffer()
            if buffer is None:
                break
            batch: PreparedBatch | None = self._preparer.prepare(frames, buffer, self._settings.get, ends)
            while batch is not None and batch.owed:  # pictures without a row (a flushed decoder's last ones) go
                self._put(self._to_infer, _Batch(batch, formed, (), self._opts.sync.mark()))  # first, before ends
                buffer = self._take_buffer()
                batch = None if buffer is None else self._preparer.prepare((), buffer, self._settings.get)
            if batch is None:
                break
            self._put(self._to_infer, _Batch(batch, formed, ends, self._opts.sync.mark()))
        self._put(self._to_infer, _DONE)

    def _infer_loop(self) -> None:
        while True:
            self._heartbeat.beat("infer")
            try:
                work = self._to_infer.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if not isinstance(work, _Batch):
                break
            batch, formed, ends = work.batch, work.formed_mono, work.ends
            raw: Any = None
            t0 = time.perf_counter()
            n_engine = batch.rows - batch.feature_rows
            if batch.rows:
                self._opts.sync.wait(work.ready)  # engine and features rows alike read the written tensor
            if n_engine:
                n = self._opts.max_batch if self._opts.pad_to_batch else n_engine
                raw = self._engine.infer(batch.tensor[:n])  # returns once the engine read its input
                raw = raw[:n_engine]
            feat_work: dict[int, float] | None = None
            if batch.feature_rows and self._opts.features is not None:
                items = sorted((i for i in batch.items if i.features), key=lambda i: i.slot)
                got = self._opts.features.infer(batch.tensor[n_engine : batch.rows], items)
                raw = got.raw if raw is None else concat_rows(raw, got.raw)
                feat_work = {i.slot: w for i, w in zip(items, got.work, strict=True)}
            infer_s = time.perf_counter() - t0
            self._free.put(batch.tensor)
            self.batches += 1
            self._put(self._to_post, _Inferred(batch, raw, infer_s, formed, ends, self._opts.sync.mark(), feat_work))
        self._put(self._to_post, _DONE)

    def _post_loop(self) -> None:
        while True:
            self._heartbeat.beat("post")
            try:
                work = self._to_post.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if work is _DONE:
                break
            if isinstance(work, _Inferred):
                self._finish(work)

    def _finish(self, work: _Inferred) -> None:
        batch = work.batch
        errors = sorted(batch.errors, key=lambda e: e.seq)  # each goes out just before its camera's next result
        rows = max(batch.rows, 1)
        if work.raw is not None:
            self._opts.sync.wait(work.ready)
        decoded = self._decode_rows(batch, work.raw)
        t0 = time.perf_counter()
        published = BatchDetections(batch.items, decoded, self._settings.get, self._names, self._delta)
        if published.dropped:
            (log.debug if self.dropped_boxes else log.warning)(
                "post: %d decoded boxes with NaN/inf values left out (corrupt engine output?); %d so far",
                published.dropped, self.dropped_boxes + published.dropped)
            self.dropped_boxes += published.dropped
        shared = (time.perf_counter() - t0) / max(len(batch.items), 1)  # the batch-wide part, shared evenly
        for k, item in enumerate(batch.items):
            t0 = time.perf_counter() - shared
            dets, age = published(k)
            fraction = work.work.get(item.slot, item.inferred_fraction) if work.work and item.features else \
                item.inferred_fraction
            share = (1.0 if item.slot >= 0 and not item.features else fraction) / rows
            times = StageTimes(
                queue=max(0.0, work.formed_mono - item.frame.capture_mono),
                decode=item.decode_s,
                infer=work.infer_s * share if item.verdict.decision is not Decision.SKIP else 0.0,
                post=time.perf_counter() - t0,
            )
            f = item.frame
            if errors:
                errors = self._errors_before(errors, f.camera, f.seq)
            result = FrameResult(
                camera=f.camera, seq=f.seq, capture_time=f.capture_time, capture_mono=f.capture_mono,
                width=item.src_w, height=item.src_h, detections=dets, bytes_in=f.bytes_in,
                bytes_decoded=item.bytes_decoded, cached=item.verdict.decision is Decision.SKIP,
                cache_age_s=age, times=times, decision=item.verdict.decision.value,
                inferred_fraction=fraction, regions=source_regions(item),
                bytes_h2d=item.bytes_h2d, bytes_d2h=len(dets) * self._opts.d2h_bytes_per_box,
                below=published.below(k),
            )
            self._sink.on_result(result, item.image)
        for err in errors:
            self._sink.on_error(err, 0)
        for eos in work.ends:
            self._sink.on_end(eos)

    def _errors_before(self, errors: list[FrameError], camera: str, seq: int) -> list[FrameError]:
        """Publishes ``camera``'s errors of frames before ``seq`` (a camera's messages keep frame order); the rest."""
        rest = []
        for err in errors:
            if err.camera == camera and err.seq < seq:
                self._sink.on_error(err, 0)
            else:
                rest.append(err)
        return rest

    def _decode_rows(self, batch: PreparedBatch, raw: Any) -> list[NDArray[np.float32]]:
        """Every row decoded once, in one call (one device-to-host copy on the GPU); a canvas shared by several
        cameras is decoded with the lowest confidence among them and filtered per camera afterwards."""
        if raw is None or batch.rows == 0:
            return []
        conf = np.ones(batch.rows, np.float32)
        iou = np.full(batch.rows, 0.7, np.float32)
        seen: set[int] = set()
        for item in batch.items:
            s = self._settings.get(item.frame.camera)
            if s is None:
                continue
            lo = s.confidence if s.rank_floor is None else min(s.confidence, s.rank_floor)
            for row in ([item.slot] if item.slot >= 0 else [p.slot for p in item.placements]):
                conf[row] = min(conf[row], lo)
                if row not in seen:
                    iou[row] = s.iou
                    seen.add(row)
        return self._opts.batch_decoder(raw, self._layout, conf, iou, MAX_DET)

    # -- helpers --------------------------------------------------------------------------------------------
    def _form_batch(self) -> Sequence[Item]:
        items = list(self._queues.take(self._opts.max_batch, POLL_S))
        if not items:
            return items
        deadline = time.monotonic() + self._opts.max_wait_s
        while len(items) < self._opts.max_batch and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._queues.wait_nonempty(remaining):
                break
            items.extend(self._queues.take(self._opts.max_batch - len(items), 0.0))
        return items

    def _take_buffer(self) -> Any:
        while True:
            self._heartbeat.beat("pre")
            try:
                return self._free.get(timeout=POLL_S)
            except queue.Empty:
                if self._stop.is_set() and all(not t.is_alive() for t in self._threads[1:2]):
                    return None

    def _put(self, q: queue.Queue[object], item: object) -> None:
        """Blocking put that keeps the heartbeat of the calling stage alive while it waits."""
        stage = threading.current_thread().name.removeprefix("pipeline:")
        while True:
            self._heartbeat.beat(stage)
            try:
                q.put(item, timeout=POLL_S)
                return
            except queue.Full:
                continue
