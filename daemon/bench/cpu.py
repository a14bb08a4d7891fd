"""`deltayolo bench cpu`: N replayed vtest cameras through the real pipeline vs a naive loop, same run."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import cv2
import numpy as np

from daemon.backend import EngineChoice
from daemon.bench.replay import measure, replay_config
from daemon.cameras import resolve_builtin
from daemon.decode.letterbox import letterbox_into
from daemon.inference.engine import Engine
from daemon.inference.model import LoadedModel, load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.inference.yolo import decode_output, to_detections
from daemon.sources.replay import load_jpeg_frames


@dataclass(frozen=True, slots=True)
class RunFigures:
    name: str
    cameras: int
    frames: int
    seconds: float
    fps: float
    p50_ms: float
    p99_ms: float
    stage_ms: dict[str, float]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", type=int, nargs="+", default=[1, 4, 8], help="camera counts to run")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each run")
    p.add_argument("--model", default="builtin:yolov8n", help="ONNX model")
    p.add_argument("--video", default="builtin:vtest", help="video replayed by every camera")
    p.add_argument("--frames", type=int, default=200, help="distinct video frames loaded (JPEG q90)")
    p.add_argument("--max-batch", type=int, default=8, help="batch size of our pipeline")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--delta", action="store_true", help="also run each camera count with delta caching on")
    p.add_argument("--int8", metavar="MODEL", help="also run our pipeline on this INT8 model (`deltayolo calibrate "
                   "--target cpu`), with and without delta as above")
    p.add_argument("--json", help="write the figures as JSON to this file")


def run_pipeline(engine: Engine, frames: Sequence[bytes], cameras: int, seconds: float, warmup: float,
                 max_batch: int, delta: bool = False) -> RunFigures:
    cfg = replay_config(cameras, max_batch, max_wait_ms=5, delta=delta, queue_size=2)
    run = measure(cfg, EngineChoice(engine, "cpu:onnxruntime", "bench"), frames, warmup, seconds)
    lat = np.asarray(run.latencies) * 1000.0
    p50, p99 = (np.percentile(lat, [50, 99]) if lat.size else (0.0, 0.0))
    name = "delta" if delta else "deltayolo"
    return RunFigures(name, cameras, int(lat.size), run.seconds, lat.size / run.seconds, float(p50), float(p99),
                      dict(run.after.stage_ms))


def run_naive(model: LoadedModel, engine: Engine, frames: Sequence[bytes], seconds: float,
              warmup: float) -> RunFigures:
    """The baseline: one frame at a time, OpenCV decode, FP32 batch 1, no overlap."""
    h, w = model.input_hw
    buf = np.zeros((1, 3, h, w), dtype=np.float32)
    times = {"decode": 0.0, "infer": 0.0, "post": 0.0}
    lat: list[float] = []
    start = time.monotonic()
    measuring_from = start + warmup
    i = 0
    while time.monotonic() < measuring_from + seconds:
        data = frames[i % len(frames)]
        i += 1
        t0 = time.monotonic()
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise RuntimeError(f"frame {i} of the benchmark video does not decode")
        lb = letterbox_into(np.asarray(img, dtype=np.uint8), h, buf[0])
        t1 = time.monotonic()
        raw = engine.infer(buf)
        t2 = time.monotonic()
        to_detections(decode_output(raw, model.layout, 0.25, 0.7)[0], lb, model.class_names)
        t3 = time.monotonic()
        if t0 >= measuring_from:
            lat.append(t3 - t0)
            for k, v in (("decode", t1 - t0), ("infer", t2 - t1), ("post", t3 - t2)):
                times[k] += v
    n = max(len(lat), 1)
    arr = np.asarray(lat) * 1000.0
    p50, p99 = (np.percentile(arr, [50, 99]) if arr.size else (0.0, 0.0))
    elapsed = time.monotonic() - measuring_from
    return RunFigures("naive", 1, len(lat), elapsed, len(lat) / elapsed, float(p50), float(p99),
                      {k: 1000.0 * v / n for k, v in times.items()})


def run_cpu_bench(args: argparse.Namespace) -> int:
    video = resolve_builtin(args.video)
    print(f"loading {args.frames} frames of {video.name} as JPEG q90 ...", flush=True)
    frames = load_jpeg_frames(video, 90, limit=args.frames)
    model = load_model(resolve_builtin(args.model))
    naive_engine = OnnxRuntimeEngine(model, max_batch=1, threads=args.threads)
    naive = run_naive(model, naive_engine, frames, args.seconds, args.warmup)
    naive_engine.close()
    engine = OnnxRuntimeEngine(model, max_batch=args.max_batch, threads=args.threads)
    ours = [
        run_pipeline(engine, frames, n, args.seconds, args.warmup, args.max_batch, delta)
        for n in args.cameras for delta in ((False, True) if args.delta else (False,))
    ]
    engine.close()
    if args.int8:
        int8 = OnnxRuntimeEngine(load_model(resolve_builtin(args.int8)), max_batch=args.max_batch, threads=args.threads)
        for n in args.cameras:
            for delta in (False, True) if args.delta else (False,):
                r = run_pipeline(int8, frames, n, args.seconds, args.warmup, args.max_batch, delta)
                ours.append(replace(r, name="int8+delta" if delta else "int8"))
        int8.close()
    print(f"\nbench cpu: {model.path.name}, {len(frames)} frames of {video.name} "
          f"({sum(map(len, frames)) / len(frames) / 1000:.0f} KB avg), {args.seconds:.0f} s per run")
    print(f"{'pipeline':<11} {'cams':>4} {'frames':>7} {'fps':>8} {'x naive':>8} {'p50 ms':>8} {'p99 ms':>8}  "
          "stages ms/frame")
    for r in [naive, *ours]:
        stages = " ".join(f"{k}={v:.1f}" for k, v in sorted(r.stage_ms.items()))
        print(f"{r.name:<11} {r.cameras:>4} {r.frames:>7} {r.fps:>8.2f} {r.fps / max(naive.fps, 1e-9):>8.2f} "
              f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f}  {stages}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"naive": asdict(naive), "ours": [asdict(r) for r in ours]}, fh, indent=2)
    return 0
