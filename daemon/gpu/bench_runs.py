"""The measured runs of `bench gpu` (see daemon.gpu.bench): (a) naive, (b) CPU decode + GPU preprocessing,
(c) the daemon's runtime on the GPU path (with and without delta caching), and the ceilings of decode, inference
and post-processing, all on the same frames."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast

import numpy as np

from daemon.gpu.bench import Figures, _Feed, _fill, _imdecode, _timed

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Streams:
    decode: Any
    infer: Any
    post: Any


@dataclass(slots=True)
class BenchContext:
    """What every variant shares: engines, streams, decoders (built once, warm)."""

    args: argparse.Namespace
    model: Any
    nvml: Any
    streams: Any
    naive: Any  # FP32, host I/O, batch 1
    fast: Any  # the engine of (b), (c) and the ceilings, on streams.infer
    decoders: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def build(args: argparse.Namespace, model: Any, nvml: Any, decoders: list[str]) -> BenchContext:
        import cupy

        from daemon.gpu.decoders import make_decoder
        from daemon.gpu.ort_cuda import OrtCudaEngine

        streams = _Streams(*(cupy.cuda.Stream(non_blocking=True) for _ in range(3)))
        naive = OrtCudaEngine(model, 1)
        fast = OrtCudaEngine(model, args.batch, fp16=args.precision == "fp16", stream=streams.infer, nhwc=args.nhwc)
        ctx = BenchContext(args, model, nvml, streams, naive, fast)
        for name in decoders:
            try:
                ctx.decoders[name] = make_decoder(name, model.input_hw[0], args.batch, fast.input_dtype)
            except Exception as exc:
                log.error("decoder %s unavailable: %s", name, exc)
                print(f"decoder {name} unavailable: {type(exc).__name__}: {exc}", flush=True)
        return ctx


def _guarded(name: str, fn: Callable[[], Figures]) -> Figures:
    try:
        return fn()
    except Exception as exc:
        log.exception("bench run %s failed", name)
        print(f"run {name} FAILED: {type(exc).__name__}: {exc}", flush=True)
        return Figures(name, extra={"failed": 1.0})


def run_variant(ctx: BenchContext, frames: list[bytes]) -> list[Figures]:
    out = [_guarded("a_naive", lambda: naive(ctx, frames)),
           _guarded("b_cpu_decode_gpu_pre", lambda: cpu_decode_gpu_pre(ctx, frames))]
    out.extend(_guarded(f"ceiling_decode[{n}]", partial(ceiling_decode, ctx, frames, n)) for n in ctx.decoders)
    first = next(iter(ctx.decoders), None)
    if first is not None:
        out.append(_guarded("ceiling_infer", lambda: ceiling_infer(ctx, frames, first)))
        out.append(_guarded("ceiling_post", lambda: ceiling_post(ctx, frames, first)))
    out.extend(_guarded(f"c_runtime[{n}]", partial(runtime, ctx, frames, n, False)) for n in ctx.decoders)
    if ctx.args.delta and first is not None:
        out.append(_guarded(f"c_runtime+delta[{first}]", partial(runtime, ctx, frames, first, True)))
    return out


def naive(ctx: BenchContext, frames: list[bytes]) -> Figures:
    from daemon.decode.letterbox import letterbox_into
    from daemon.inference.yolo import decode_output

    size = ctx.model.input_hw[0]
    host = np.zeros((1, 3, size, size), np.float32)
    feed = _Feed(frames, ctx.args.cameras)

    def step() -> tuple[int, list[float], int]:
        f = feed.batch(1)[0]
        letterbox_into(_imdecode(f.jpeg), size, host[0])
        raw = ctx.naive.infer_host(host)
        decode_output(raw, ctx.model.layout, 0.25, 0.7)
        return 1, [time.monotonic() - f.capture_mono], host.nbytes

    return _timed("a_naive", ctx.args.seconds, ctx.args.warmup, step, ctx.nvml)


def cpu_decode_gpu_pre(ctx: BenchContext, frames: list[bytes]) -> Figures:
    import cupy

    from daemon.gpu.kernels import LetterboxBatch
    from daemon.gpu.postprocess import GpuPostprocessor

    b, size, s = ctx.args.batch, ctx.model.input_hw[0], ctx.streams
    eng = ctx.fast
    kernel = LetterboxBatch(eng.input_dtype, b)
    post = GpuPostprocessor(300)
    x = cupy.zeros((b, 3, size, size), eng.input_dtype)
    raw = cupy.zeros(eng.output_shape(b), eng.output_dtype)
    ev1, ev2 = cupy.cuda.Event(disable_timing=True), cupy.cuda.Event(disable_timing=True)
    conf, iou = np.full(b, 0.25, np.float32), np.full(b, 0.7, np.float32)
    feed = _Feed(frames, ctx.args.cameras)
    pool = ThreadPoolExecutor(max_workers=16)
    ahead = ThreadPoolExecutor(max_workers=1)

    def decode() -> tuple[float, list[Any]]:
        batch = feed.batch(b)
        return batch[0].capture_mono, list(pool.map(lambda f: _imdecode(f.jpeg), batch))

    pending: list[Future[tuple[float, list[Any]]]] = [ahead.submit(decode)]

    def step() -> tuple[int, list[float], int]:
        t0, imgs = pending[0].result()
        pending[0] = ahead.submit(decode)  # the CPU decodes the next batch while the GPU works on this one
        with s.decode:
            dev = [cupy.asarray(img) for img in imgs]
        _lbs, table = kernel(dev, size, x, s.decode, bgr=True)
        ev1.record(s.decode)
        s.infer.wait_event(ev1)
        eng.infer_into(x, raw)
        ev2.record(s.infer)
        s.post.wait_event(ev2)
        post(raw, conf, iou, stream=s.post)
        dt = time.monotonic() - t0
        return len(imgs), [dt] * len(imgs), sum(int(i.nbytes) for i in imgs) + table

    try:
        f = _timed("b_cpu_decode_gpu_pre", ctx.args.seconds, ctx.args.warmup, step, ctx.nvml)
    finally:
        ahead.shutdown(wait=True)
        pool.shutdown(wait=True)
    f.h2d_bytes_per_frame += post.bytes_h2d / max(f.frames, 1)
    f.d2h_bytes_per_frame = post.bytes_d2h / max(f.frames, 1)
    return f


def _decoded_batch(ctx: BenchContext, frames: list[bytes], decoder: str) -> Any:
    import cupy

    b, size = ctx.args.batch, ctx.model.input_hw[0]
    x = cupy.zeros((b, 3, size, size), ctx.fast.input_dtype)
    ctx.decoders[decoder].decode_into([frames[i % len(frames)] for i in range(b)], x, None, ctx.streams.decode)
    ctx.streams.decode.synchronize()
    return x


def ceiling_decode(ctx: BenchContext, frames: list[bytes], decoder: str) -> Figures:
    """GPU decode + letterbox + signatures alone: ``depth`` output buffers in rotation, a host wait only when a
    buffer comes round again (as in the pipeline)."""
    import cupy

    from daemon.gpu.kernels import PinnedStaging

    b, size, depth = ctx.args.batch, ctx.model.input_hw[0], max(ctx.args.depth, 2)
    dec, s = ctx.decoders[decoder], ctx.streams.decode
    ring = [(cupy.zeros((b, 3, size, size), dec.dtype), cupy.zeros((b, size // 8, size // 8), cupy.uint8),
             PinnedStaging(b * 512 * 1024), cupy.cuda.Event(disable_timing=True)) for _ in range(depth)]
    keep: list[Any] = [None] * depth
    feed = _Feed(frames, ctx.args.cameras)
    k = [0]

    def step() -> tuple[int, list[float], int]:
        i = k[0] % depth
        k[0] += 1
        out, sig, staging, ev = ring[i]
        ev.synchronize()
        jpegs = [f.jpeg for f in feed.batch(b)]
        keep[i] = ctx.decoders[decoder].decode_into(jpegs, out, sig, s, staging)
        ev.record(s)
        return b, [], int(keep[i].bytes_h2d)

    f = _timed(f"ceiling_decode[{decoder}]", ctx.args.seconds, ctx.args.warmup, step, ctx.nvml)
    s.synchronize()
    return f


def ceiling_infer(ctx: BenchContext, frames: list[bytes], decoder: str) -> Figures:
    import cupy

    x = _decoded_batch(ctx, frames, decoder)
    raw = cupy.zeros(ctx.fast.output_shape(ctx.args.batch), ctx.fast.output_dtype)

    def step() -> tuple[int, list[float], int]:
        ctx.fast.infer_into(x, raw)
        return ctx.args.batch, [], 0

    return _timed("ceiling_infer", ctx.args.seconds, ctx.args.warmup, step, ctx.nvml)


def ceiling_post(ctx: BenchContext, frames: list[bytes], decoder: str) -> Figures:
    import cupy

    from daemon.gpu.postprocess import GpuPostprocessor

    b = ctx.args.batch
    x = _decoded_batch(ctx, frames, decoder)
    raw = cupy.zeros(ctx.fast.output_shape(b), ctx.fast.output_dtype)
    ctx.fast.infer_into(x, raw)
    post = GpuPostprocessor(300)
    conf, iou = np.full(b, 0.25, np.float32), np.full(b, 0.7, np.float32)

    def step() -> tuple[int, list[float], int]:
        post(raw, conf, iou, stream=ctx.streams.post)
        return b, [], 0

    f = _timed("ceiling_post", ctx.args.seconds, ctx.args.warmup, step, ctx.nvml)
    f.d2h_bytes_per_frame = post.bytes_d2h / max(f.frames, 1)
    return f


def runtime(ctx: BenchContext, frames: list[bytes], decoder: str, delta: bool) -> Figures:
    """(c): the daemon itself (daemon.app.Runtime: replayed cameras -> frame queues -> the staged runner on three
    CUDA streams -> result fan-out), every camera replaying ``frames`` in order as fast as the pipeline takes them.
    Its own engine (the configured precision; FP16 uses NHWC), decoder ``decoder``."""
    from daemon.backend import build_engine
    from daemon.bench.replay import measure, replay_config
    from daemon.config.model import ModelConfig
    from daemon.gpu.nvml import NvmlSampler

    args = ctx.args
    model = ModelConfig(path=str(ctx.model.path), precision=args.precision,
                        gpu_decoder=cast("Literal['dali', 'nvimgcodec']", decoder))
    cfg = replay_config(args.cameras, args.batch, max_wait_ms=2, delta=delta, queue_size=4, model=model)
    choice = build_engine(cfg.model, args.batch)
    sampler = NvmlSampler(ctx.nvml)

    seen: list[Any] = []

    def changemap(rt: Any) -> tuple[float, int]:  # the GPU preparer's device change-map counters
        prep = rt._preparer
        seen.append(prep)
        return getattr(prep, "changemap_s", 0.0), getattr(prep, "changemap_frames", 0)

    try:  # cameras out of step (stagger 7), as in (a) and (b)
        run = measure(cfg, choice, frames, args.warmup + 2.0, args.seconds, stagger=7, during=lambda: sampler,
                      probe=changemap)
    finally:
        choice.engine.close()
    before, after = run.before, run.after
    f = Figures(f"c_runtime{'+delta' if delta else ''}[{decoder}]", frames=len(run.latencies), seconds=run.seconds)
    processed = sum(c.processed for c in after.cameras) - sum(c.processed for c in before.cameras)
    h2d = sum(c.bytes_h2d for c in after.cameras) - sum(c.bytes_h2d for c in before.cameras)
    d2h = sum(c.bytes_d2h for c in after.cameras) - sum(c.bytes_d2h for c in before.cameras)
    _fill(f, run.latencies, 0, sampler.summary())
    f.h2d_bytes_per_frame = h2d / max(processed, 1)
    f.d2h_bytes_per_frame = d2h / max(processed, 1)
    f.extra = {f"stage_ms_{k}": v for k, v in dict(after.stage_ms).items()}
    f.extra["backend_is_gpu"] = 1.0 if choice.backend.startswith("gpu:") else 0.0
    for k in ("full", "skip", "regions"):
        f.extra[f"delta_{k}"] = float(sum(getattr(c, f"delta_{k}", 0) for c in after.cameras)
                                      - sum(getattr(c, f"delta_{k}", 0) for c in before.cameras))
    f.extra["inferred_fraction"] = float(np.mean([c.inferred_fraction for c in after.cameras]))
    (s0, n0), (s1, n1) = run.probe_before, run.probe_after
    if n1 > n0:
        f.extra["changemap_us_per_frame"] = (s1 - s0) / (n1 - n0) * 1e6
    cost = getattr(seen[-1], "changemap_device_cost", None) if seen else None
    try:  # the runtime has stopped: its widest round, replayed as a CUDA graph
        measured = cost() if cost is not None else None
    except Exception as exc:  # a figure less, not a failed run (CuPy raises plain RuntimeErrors and CUDA errors)
        log.warning("change map device cost not measured: %s", exc)
        measured = None
    if measured is not None:
        f.extra["changemap_graph_us_per_frame"] = measured[0] * 1e6
        f.extra["changemap_graph_round_frames"] = float(measured[1])
    return f
