"""`deltayolo bench gpu`: three pipelines on the same replayed cameras in one run, plus the card's ceilings.

(a) naive: OpenCV decode on the CPU, FP32 NCHW upload, onnxruntime CUDA with host I/O, batch 1;
(b) CPU decode (threads), uint8 upload, letterbox on the GPU (one CuPy kernel), IO binding, GPU NMS, batched;
(c) deltayolo: the daemon's runtime on the GPU path (JPEG bytes up, DALI, IO binding, GPU NMS, staged threads).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.app import Runtime
from daemon.backend import build_engine
from daemon.bench.cpu import _Counter
from daemon.cameras import resolve_builtin
from daemon.config.model import BatchingConfig, CameraConfig, Config, ModelConfig, NodeConfig, ReplaySource, StatsConfig
from daemon.decode.letterbox import letterbox_into, letterbox_params
from daemon.inference.model import load_model
from daemon.inference.yolo import decode_output
from daemon.sources.base import Source
from daemon.sources.replay import ReplaySource as ReplayReader
from daemon.sources.replay import load_jpeg_frames


@dataclass(slots=True)
class Figures:
    name: str
    frames: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    h2d_bytes_per_frame: float = 0.0
    pcie_rx_mb_s: float | None = None  # host -> device as NVML counts it
    pcie_tx_mb_s: float | None = None
    gpu_mem_mb: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--frames", type=int, default=240, help="distinct vtest frames (JPEG q90)")
    p.add_argument("--size", choices=["native", "1280x960"], default="native", help="frame size of the replay")
    p.add_argument("--model", default="builtin:yolov8n")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="inference precision of (b), (c)")
    p.add_argument("--json", help="write the figures here")


class _Pcie:
    """Samples NVML PCIe throughput (KB/s over 20 ms windows) in a thread while a run lasts."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.rx: list[float] = []
        self.tx: list[float] = []
        self.mem: float | None = None
        self._t: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self._nv = None

    def __enter__(self) -> _Pcie:
        if self._nv is not None:
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def _loop(self) -> None:
        nv = self._nv
        while not self._stop.wait(0.05):
            self.rx.append(nv.nvmlDeviceGetPcieThroughput(self._h, nv.NVML_PCIE_UTIL_RX_BYTES) / 1000.0)
            self.tx.append(nv.nvmlDeviceGetPcieThroughput(self._h, nv.NVML_PCIE_UTIL_TX_BYTES) / 1000.0)
        self.mem = nv.nvmlDeviceGetMemoryInfo(self._h).used / 1e6

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()

    def fill(self, f: Figures) -> None:
        if self.rx:
            f.pcie_rx_mb_s, f.pcie_tx_mb_s = float(np.mean(self.rx)), float(np.mean(self.tx))
        f.gpu_mem_mb = self.mem


def _percentiles(lat: Sequence[float]) -> tuple[float, float]:
    if not lat:
        return 0.0, 0.0
    p50, p99 = np.percentile(np.asarray(lat) * 1000.0, [50, 99])
    return float(p50), float(p99)


def _timed(name: str, seconds: float, warmup: float, step: Callable[[], tuple[int, list[float], int]]) -> Figures:
    """Call ``step`` (-> frames done, their latencies, H2D bytes) until warm-up + seconds have passed."""
    end_warm = time.monotonic() + warmup
    while time.monotonic() < end_warm:
        step()
    f = Figures(name)
    lat: list[float] = []
    h2d = 0
    with _Pcie() as pcie:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            n, step_lat, b = step()
            f.frames += n
            lat.extend(step_lat)
            h2d += b
        f.seconds = time.monotonic() - t0
    pcie.fill(f)
    f.fps = f.frames / f.seconds
    f.p50_ms, f.p99_ms = _percentiles(lat)
    f.h2d_bytes_per_frame = h2d / max(f.frames, 1)
    return f


def run(args: argparse.Namespace) -> int:
    import cupy

    from daemon.gpu.dali_decode import DaliDecoder
    from daemon.gpu.letterbox_kernel import LetterboxKernel
    from daemon.gpu.ort_cuda import OrtCudaEngine
    from daemon.gpu.postprocess import decode_rows

    frames = load_jpeg_frames(resolve_builtin("builtin:vtest"), 90, limit=args.frames)
    if args.size == "1280x960":
        frames = [_upscale(f) for f in frames]
    model = load_model(resolve_builtin(args.model))
    size = model.input_hw[0]
    engine = OrtCudaEngine(model, max_batch=args.batch)  # (a) and the FP32 ceiling
    fast = OrtCudaEngine(model, max_batch=args.batch, fp16=True) if args.precision == "fp16" else engine
    jpeg_bytes = float(np.mean([len(f) for f in frames]))
    results: list[Figures] = []
    i = [0]

    def nxt() -> bytes:
        i[0] += 1
        return frames[i[0] % len(frames)]

    host = np.zeros((1, 3, size, size), np.float32)
    conf = np.full(args.batch, 0.25, np.float32)
    iou = np.full(args.batch, 0.7, np.float32)

    def naive() -> tuple[int, list[float], int]:
        t = time.monotonic()
        letterbox_into(_imdecode(nxt()), size, host[0])
        raw = engine.infer_host(host)
        decode_output(raw, model.layout, 0.25, 0.7)
        return 1, [time.monotonic() - t], host.nbytes

    results.append(_timed("a_naive", args.seconds, args.warmup, naive))

    pool = ThreadPoolExecutor(max_workers=8)
    kernel = LetterboxKernel()
    dev_in = cupy.zeros((args.batch, 3, size, size), cupy.float32)

    def cpu_decode_gpu_pre() -> tuple[int, list[float], int]:
        t = time.monotonic()
        batch = [nxt() for _ in range(args.batch)]
        imgs = list(pool.map(_imdecode, batch))
        up = 0
        for k, img in enumerate(imgs):
            d = cupy.asarray(img)
            up += img.nbytes
            kernel(d, letterbox_params(img.shape[1], img.shape[0], size), size, dev_in[k])
        raw = fast.infer(dev_in)
        decode_rows(raw, model.layout, conf, iou)
        dt = time.monotonic() - t
        return len(batch), [dt] * len(batch), up

    results.append(_timed("b_cpu_decode_gpu_pre", args.seconds, args.warmup, cpu_decode_gpu_pre))
    pool.shutdown()

    dali = DaliDecoder(size, args.batch)

    def decode_only() -> tuple[int, list[float], int]:
        batch = [nxt() for _ in range(args.batch)]
        dali.decode(batch)
        return len(batch), [], sum(map(len, batch))

    results.append(_timed("ceiling_dali_decode_letterbox", args.seconds / 2, 1.0, decode_only))
    dev = dali.decode([nxt() for _ in range(args.batch)])

    def infer_only() -> tuple[int, list[float], int]:
        fast.infer(dev)
        cupy.cuda.get_current_stream().synchronize()
        return args.batch, [], 0

    results.append(_timed("ceiling_inference", args.seconds / 2, 1.0, infer_only))
    raw = fast.infer(dev)

    def post_only() -> tuple[int, list[float], int]:
        decode_rows(raw, model.layout, conf, iou)
        return args.batch, [], 0

    results.append(_timed("ceiling_postprocess", args.seconds / 2, 1.0, post_only))
    engine.close()
    fast.close()
    results.append(_ours(frames, args))
    base = results[0].fps
    print(f"\nbench gpu: {model.path.name} ({args.precision} in (b), (c) and the ceilings), {args.cameras} cameras, "
          f"{len(frames)} frames ({args.size}, "
          f"{jpeg_bytes / 1000:.0f} KB JPEG avg), batch {args.batch}, {args.seconds:.0f} s per run")
    print(f"{'pipeline':<30} {'fps':>9} {'x (a)':>7} {'p50 ms':>8} {'p99 ms':>8} {'H2D KB/f':>9} {'PCIe rx MB/s':>12} "
          f"{'GPU MB':>8}")
    for r in results:
        rx = "-" if r.pcie_rx_mb_s is None else f"{r.pcie_rx_mb_s:.0f}"
        mem = "-" if r.gpu_mem_mb is None else f"{r.gpu_mem_mb:.0f}"
        print(f"{r.name:<30} {r.fps:>9.1f} {r.fps / base:>7.2f} {r.p50_ms:>8.1f} {r.p99_ms:>8.1f} "
              f"{r.h2d_bytes_per_frame / 1000:>9.1f} {rx:>12} {mem:>8}")
    ceilings = {r.name: r.fps for r in results if r.name.startswith("ceiling")}
    bound = min(ceilings, key=lambda k: ceilings[k])
    ours = results[-1]
    print(f"(c)/(a) = {ours.fps / base:.1f}x; H2D per frame = {ours.h2d_bytes_per_frame / jpeg_bytes:.2f}x the JPEG "
          f"bytes; lowest ceiling: {bound} {ceilings[bound]:.0f} fps; (c) is {ours.fps / ceilings[bound]:.0%} of it")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"jpeg_bytes": jpeg_bytes, "results": [asdict(r) for r in results]}, fh, indent=2)
    return 0


def _imdecode(jpeg: bytes) -> NDArray[np.uint8]:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise RuntimeError("a benchmark frame does not decode")
    return np.asarray(img, dtype=np.uint8)


def _upscale(jpeg: bytes) -> bytes:
    img = _imdecode(jpeg)
    big = cv2.resize(img, (1280, 960), interpolation=cv2.INTER_LINEAR)
    _, enc = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return bytes(enc.tobytes())


def _ours(frames: Sequence[bytes], args: argparse.Namespace) -> Figures:
    cams = tuple(CameraConfig(id=f"cam{i}", source=ReplaySource(type="replay", path="bench", realtime=False),
                              queue_size=4) for i in range(args.cameras))
    cfg = Config(node=NodeConfig(site="b", area="b", line="b", node="b"),
                 model=ModelConfig(path=args.model, precision=args.precision),
                 cameras=cams, batching=BatchingConfig(max_batch=args.batch, max_wait_ms=2),
                 stats=StatsConfig(interval_s=3600))
    choice = build_engine(cfg.model, args.batch)

    def factory(cam: CameraConfig, sink: Any) -> Source:
        return ReplayReader(cam.id, "bench", sink, loop=True, realtime=False, frames=frames)

    counter = _Counter()
    rt = Runtime(cfg, [counter], engine=choice, source_factory=factory)
    rt.start()
    f = Figures(f"c_deltayolo[{choice.backend}]")
    try:
        time.sleep(args.warmup)
        before = rt.stats.snapshot([], 1.0)
        counter.measuring = True
        with _Pcie() as pcie:
            t0 = time.monotonic()
            time.sleep(args.seconds)
            counter.measuring = False
            f.seconds = time.monotonic() - t0
        after = rt.stats.snapshot([], 1.0)
        pcie.fill(f)
    finally:
        rt.stop(15.0)
        choice.engine.close()
    f.frames = len(counter.latencies)
    f.fps = f.frames / f.seconds
    f.p50_ms, f.p99_ms = _percentiles(counter.latencies)
    h2d = sum(c.bytes_h2d for c in after.cameras) - sum(c.bytes_h2d for c in before.cameras)
    processed = sum(c.processed for c in after.cameras) - sum(c.processed for c in before.cameras)
    f.h2d_bytes_per_frame = h2d / max(processed, 1)
    f.extra = dict(after.stage_ms)
    return f
