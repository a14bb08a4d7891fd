"""`deltayolo bench gpu`: N cameras replaying vtest (768x576, and a 1280x960 upscale of it) as fast as possible,
three pipelines in one run, plus the ceilings of each GPU stage in the same run:

(a) naive: OpenCV decode, letterbox on the CPU, FP32 NCHW upload, onnxruntime CUDA with host I/O, NMS on the CPU,
    batch 1;
(b) OpenCV decode (thread pool), uint8 upload, letterbox on the GPU (fused kernel), IO binding, GPU NMS, batched;
(c) deltayolo: the daemon's runtime (replayed cameras, frame queues, the staged runner on three CUDA streams: JPEG
    bytes up, GPU decode, IO binding, GPU NMS), once per installed GPU decoder; with --delta also with delta caching.
Ceilings: GPU decode + letterbox alone, inference alone, post-processing alone, each at the same batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

Step = Callable[[], tuple[int, list[float], int]]  # -> frames done, their latencies (s), H2D bytes


@dataclass(slots=True)
class Figures:
    name: str
    frames: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    h2d_bytes_per_frame: float = 0.0
    d2h_bytes_per_frame: float = 0.0
    pcie_rx_mb_s: float | None = None  # host -> device, NVML
    pcie_tx_mb_s: float | None = None
    gpu_mem_mb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", type=int, default=16, help="cameras replaying vtest (round robin into batches)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per pipeline")
    p.add_argument("--warmup", type=float, default=1.5, help="seconds run before each measurement")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--depth", type=int, default=4, help="batches in flight in (c)")
    p.add_argument("--frames", type=int, default=120, help="distinct vtest frames (JPEG q90)")
    p.add_argument("--sizes", default="native,1280x960", help="comma list of native | 1280x960")
    p.add_argument("--model", default="yolov8n", help="a known model name (daemon.models.fetch) or a path")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp16", help="for (b), (c) and ceilings")
    p.add_argument("--decoders", default="auto", help="comma list of dali | nvimgcodec | auto (what is installed)")
    p.add_argument("--nhwc", action=argparse.BooleanOptionalAction, default=True,
                   help="onnxruntime prefer_nhwc for (b), (c) and the ceilings (H200: FP16 b32 3,135 -> 3,585 fps)")
    p.add_argument("--delta", action="store_true", help="also run (c) with delta caching on (same cameras)")
    p.add_argument("--json", help="write every figure here")


def _percentiles(lat: list[float]) -> tuple[float, float]:
    if not lat:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.asarray(lat) * 1000.0, [50, 99])
    return float(p50), float(p99)


def _timed(name: str, seconds: float, warmup: float, step: Step, nvml: Any) -> Figures:
    from daemon.gpu.nvml import NvmlSampler

    end_warm = time.monotonic() + warmup
    while time.monotonic() < end_warm:
        step()
    f = Figures(name)
    lat: list[float] = []
    h2d = 0
    with NvmlSampler(nvml) as sampler:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            n, batch_lat, b = step()
            f.frames += n
            lat.extend(batch_lat)
            h2d += b
        f.seconds = time.monotonic() - t0
    _fill(f, lat, h2d, sampler.summary())
    return f


def _fill(f: Figures, lat: list[float], h2d: int, summary: Any) -> None:
    f.fps = f.frames / max(f.seconds, 1e-9)
    f.p50_ms, f.p99_ms = _percentiles(lat)
    f.h2d_bytes_per_frame = h2d / max(f.frames, 1)
    if summary is not None:
        f.pcie_rx_mb_s, f.pcie_tx_mb_s, f.gpu_mem_mb = summary.pcie_rx_mb_s, summary.pcie_tx_mb_s, \
            summary.mem_used_peak_mb


def _imdecode(jpeg: bytes) -> NDArray[np.uint8]:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise RuntimeError("a benchmark frame does not decode")
    return np.asarray(img, dtype=np.uint8)


def vtest_jpegs(path: Path, count: int, size: str) -> list[bytes]:
    """``count`` frames of the video as q90 JPEGs, native or upscaled to 1280x960."""
    cap = cv2.VideoCapture(str(path))
    out: list[bytes] = []
    try:
        while len(out) < count:
            ok, img = cap.read()
            if not ok:
                break
            if size == "1280x960":
                img = cv2.resize(img, (1280, 960), interpolation=cv2.INTER_LINEAR)
            ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if ok:
                out.append(bytes(enc.tobytes()))
    finally:
        cap.release()
    if not out:
        raise RuntimeError(f"no frames read from {path}")
    return out


class _Feed:
    """Round-robin over cameras; each camera replays the frames from its own offset."""

    def __init__(self, frames: list[bytes], cameras: int) -> None:
        self.frames, self.cameras, self.i = frames, cameras, 0

    def batch(self, n: int) -> list[Any]:
        from daemon.types import Frame

        out = []
        for _ in range(n):
            cam = self.i % self.cameras
            seq = self.i // self.cameras
            data = self.frames[(seq + cam * 7) % len(self.frames)]
            out.append(Frame(f"cam{cam}", seq, time.time(), time.monotonic(), jpeg=data))
            self.i += 1
        return out


def _model(name: str) -> Any:
    from daemon.inference.model import load_model

    if os.path.sep in name or name.endswith(".onnx"):
        return load_model(Path(name))
    from daemon.models.fetch import ensure

    return load_model(ensure(name))


def run(args: argparse.Namespace) -> int:
    from daemon.gpu.capabilities import detect
    from daemon.gpu.nvml import Nvml

    caps = detect("auto")
    if not caps.gpu_path:
        print(f"bench gpu: the GPU path cannot run here: {caps.reason}; notes: {', '.join(caps.notes)}")
        return 2
    import cupy

    cupy.cuda.Device(0).use()
    model = _model(args.model)
    decoders = [d for d in ("dali", "nvimgcodec") if getattr(caps, d)] if args.decoders == "auto" else \
        args.decoders.split(",")
    nvml = Nvml(0)
    from daemon.models.fetch import ensure

    vtest = ensure("vtest")
    report: dict[str, Any] = {"gpu": caps.gpu_name, "backend": caps.backend, "args": vars(args), "variants": {}}
    print(f"bench gpu on {caps.gpu_name}: {model.path.name}, {args.cameras} cameras, batch {args.batch}, depth "
          f"{args.depth}, {args.precision}, decoders {decoders}; {args.seconds:.0f} s per run", flush=True)
    from daemon.gpu.bench_runs import BenchContext, run_variant

    ctx = BenchContext.build(args, model, nvml, decoders)
    for size in args.sizes.split(","):
        frames = vtest_jpegs(vtest, args.frames, size)
        results = run_variant(ctx, frames)
        report["variants"][size] = {"jpeg_bytes": float(np.mean([len(f) for f in frames])),
                                    "results": [asdict(r) for r in results]}
        print_table(size, frames, results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2), encoding="utf-8")
    nvml.close()
    return 0


def print_table(size: str, frames: list[bytes], results: list[Figures], args: argparse.Namespace) -> None:
    jpeg = float(np.mean([len(f) for f in frames]))
    h, w = _imdecode(frames[0]).shape[:2]
    base = next((r.fps for r in results if r.name.startswith("a_")), 0.0) or 1.0
    print(f"\n== vtest {w}x{h} ({size}), {len(frames)} frames, {jpeg / 1000:.1f} KB JPEG avg, {args.cameras} cameras")
    print(f"{'pipeline':<34} {'fps':>9} {'x (a)':>7} {'p50 ms':>8} {'p99 ms':>8} {'H2D KB/f':>9} {'D2H B/f':>8} "
          f"{'PCIe rx MB/s':>12} {'PCIe tx':>8} {'GPU MB':>7}")
    for r in results:
        rx = "-" if r.pcie_rx_mb_s is None else f"{r.pcie_rx_mb_s:.0f}"
        tx = "-" if r.pcie_tx_mb_s is None else f"{r.pcie_tx_mb_s:.0f}"
        mem = "-" if r.gpu_mem_mb is None else f"{r.gpu_mem_mb:.0f}"
        print(f"{r.name:<34} {r.fps:>9.1f} {r.fps / base:>7.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
              f"{r.h2d_bytes_per_frame / 1000:>9.1f} {r.d2h_bytes_per_frame:>8.0f} {rx:>12} {tx:>8} {mem:>7}")
    for r in results:
        if not r.name.startswith("c_"):
            continue
        dec = r.name[r.name.index("[") + 1 : -1]
        ceil = {k: v.fps for v in results for k in ("decode", "infer", "post")
                if v.name == f"ceiling_{k}" + (f"[{dec}]" if k == "decode" else "") and v.fps > 0}
        if not ceil:
            continue
        low = min(ceil, key=lambda k: ceil[k])
        # each stage thread's busy share = its ms per frame x frames per second (the runner's own stage times)
        busy = {k: r.extra.get(f"stage_ms_{k}", 0.0) * r.fps / 1000.0 for k in ("decode", "infer", "post")}
        bound = max(busy, key=lambda k: busy[k])
        stage = {"decode": "pre (decode)", "infer": "infer", "post": "post"}
        more = "stage busy " + ", ".join(f"{stage[k]} {v:.0%}" for k, v in busy.items())
        more += "; stage ms/frame " + ", ".join(f"{k.removeprefix('stage_ms_')} {v:.2f}" for k, v in r.extra.items()
                                             if k.startswith("stage_ms_"))
        if "+delta" in r.name:
            more += (f"; delta decisions full/regions/skip {r.extra.get('delta_full', 0):.0f}/"
                     f"{r.extra.get('delta_regions', 0):.0f}/{r.extra.get('delta_skip', 0):.0f}, "
                     f"pixels inferred {r.extra.get('inferred_fraction', 1.0):.0%}")
            if "changemap_graph_us_per_frame" in r.extra and r.fps > 0:
                us = r.extra["changemap_graph_us_per_frame"]
                more += (f"; change map on the device {us:.2f} us a frame = {us * r.fps / 1e6:.2%} of a frame's "
                         f"pipeline time (1/fps; its widest round of "
                         f"{r.extra.get('changemap_graph_round_frames', 0):.0f} frames replayed as a CUDA graph)")
            if "changemap_us_per_frame" in r.extra and r.fps > 0:
                us = r.extra["changemap_us_per_frame"]
                more += (f"; change map as issued in the run {us:.1f} us a frame = {us * r.fps / 1e6:.1%} (events "
                         f"around the uploads and kernels, with the host's gaps between them)")
        print(f"{r.name}: {r.fps / base:.1f}x (a); H2D/frame = {r.h2d_bytes_per_frame / jpeg:.3f}x the JPEG bytes; "
              f"busiest stage {stage[bound]}" + (f" (its GPU ceiling {ceil[bound]:.0f} fps: {r.fps / ceil[bound]:.0%} "
                                                 f"of it)" if bound in ceil else "")
              + f"; lowest ceiling {low} {ceil[low]:.0f} fps ({r.fps / ceil[low]:.0%} of it); {more}")


def main(argv: list[str] | None = None) -> int:
    """``python -m daemon.gpu.bench`` (the CLI wires ``add_arguments``/``run`` as ``deltayolo bench gpu``)."""
    parser = argparse.ArgumentParser(prog="deltayolo bench gpu", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
