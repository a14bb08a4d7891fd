"""Throughput tuning runs for the daemon's GPU path (a diagnostic for the device machine, not the benchmark):
the inference ceiling per batch size (NHWC and NCHW), nvImageCodec's decode ceiling per backend, then the daemon
Runtime on N replayed vtest cameras per variant (decoder, batch, GIL switch interval, delta, layout), with stage
busy shares, GPU utilization from NVML and, for delta runs, the device change-map cost per frame; --placement
prints the nodes onnxruntime leaves to the CPU.

Usage: python3 tools/gpu_tune.py --variants "nvimgcodec:64:1,nvimgcodec-hw:32:1:delta" [--ceilings 32,64]
A variant is decoder[-backends]:batch:switch_ms[:delta][:nchw] (switch_ms 0: what the Runtime sets).
Results of 2026-11-28: docs/results/2026-11-28-h200-tune-session3.txt."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import replace
from typing import Any


def _ceiling(model: Any, batch: int, nhwc: bool, fp16: bool = True, runs: int = 30) -> float:
    import cupy

    from daemon.gpu.ort_cuda import OrtCudaEngine
    from daemon.gpu.streams import CudaStages

    stages = CudaStages(0)
    eng = OrtCudaEngine(model, max_batch=batch, fp16=fp16, stream=stages.infer, nhwc=nhwc)
    x = cupy.zeros((batch, 3, 640, 640), eng.input_dtype)
    with stages.infer:
        for _ in range(3):
            eng.infer(x)
        t0 = time.perf_counter()
        for _ in range(runs):
            eng.infer(x)
        stages.infer.synchronize()
    dt = (time.perf_counter() - t0) / runs
    eng.close()
    return batch / dt


def _decode_ceiling(frames: list[bytes], kinds: str, batch: int = 32, runs: int = 20) -> float:
    import cupy

    from daemon.gpu.kernels import PinnedStaging
    from daemon.gpu.nvimgcodec_decode import NvImgCodecDecoder

    dec = NvImgCodecDecoder(640, batch, dtype=cupy.float16, backends=kinds)
    out = cupy.empty((batch, 3, 640, 640), cupy.float16)
    staging = PinnedStaging(batch * 512 * 1024)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(3):
            dec.decode_into(frames[i * batch % 64 : i * batch % 64 + batch], out, None, stream, staging)
        stream.synchronize()
        t0 = time.perf_counter()
        for i in range(runs):
            dec.decode_into(frames[i * batch % 64 : i * batch % 64 + batch], out, None, stream, staging)
            stream.synchronize()
    return batch * runs / (time.perf_counter() - t0)


class _Util:
    """NVML GPU and memory-controller utilization sampled every 50 ms while measuring."""

    def __init__(self) -> None:
        self.samples: list[tuple[int, int, int]] = []
        self._stop = threading.Event()

    def __enter__(self) -> _Util:
        def loop() -> None:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            while not self._stop.wait(0.05):
                u = pynvml.nvmlDeviceGetUtilizationRates(h)
                try:
                    jpg = int(pynvml.nvmlDeviceGetJpgUtilization(h)[0])
                except Exception:
                    jpg = -1
                self.samples.append((int(u.gpu), int(u.memory), jpg))

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(1)

    def context(self) -> _Util:
        return self

    def summary(self) -> str:
        if not self.samples:
            return "no NVML samples"
        n = len(self.samples)
        return (f"GPU util {sum(s[0] for s in self.samples) / n:.0f} %, mem {sum(s[1] for s in self.samples) / n:.0f} "
                f"%, jpg engines {sum(s[2] for s in self.samples) / n:.0f} %")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="nvimgcodec:32:0:0")
    ap.add_argument("--ceilings", default="", help="batch sizes for the inference ceiling (NHWC and NCHW)")
    ap.add_argument("--decode-ceilings", default="", help="nvImageCodec backends (auto,hw,gpu,hybrid) to time")
    ap.add_argument("--placement", action="store_true",
                    help="print which nodes onnxruntime leaves to the CPU (FP16, NHWC)")
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    args = ap.parse_args()

    from daemon.backend import _gpu_choice
    from daemon.bench.replay import measure, replay_config
    from daemon.config.model import ModelConfig
    from daemon.gpu.bench import vtest_jpegs
    from daemon.gpu.ort_cuda import OrtCudaEngine
    from daemon.gpu.streams import CudaStages
    from daemon.inference.model import load_model
    from daemon.models.fetch import ensure

    model_path = str(ensure("yolov8n"))
    model = load_model(model_path)
    if args.placement:
        import onnxruntime as ort

        from daemon.gpu.ort_cuda import to_fp16

        opts = ort.SessionOptions()
        opts.log_severity_level = 0
        opts.log_verbosity_level = 1
        ort.InferenceSession(to_fp16(model.onnx_bytes, keep_io_types=False), sess_options=opts,
                             providers=[("CUDAExecutionProvider", {"prefer_nhwc": "1"}), "CPUExecutionProvider"])
    for b in [int(x) for x in args.ceilings.split(",") if x]:
        for nhwc in (True, False):
            what = f"ceiling infer b{b} nhwc={int(nhwc)}"
            try:
                print(f"{what}: {_ceiling(model, b, nhwc):.0f} frames/s", flush=True)
            except Exception as exc:
                print(f"{what}: FAILED {exc}", flush=True)
    frames = vtest_jpegs(ensure("vtest"), 120, "native")
    for kinds in [k for k in args.decode_ceilings.split(",") if k]:
        try:
            print(f"ceiling decode nvimgcodec-{kinds} b32: {_decode_ceiling(frames, kinds):.0f} frames/s", flush=True)
        except Exception as exc:
            print(f"ceiling decode nvimgcodec-{kinds}: FAILED {exc}", flush=True)
    default_switch = sys.getswitchinterval()
    for spec in [v for v in args.variants.split(",") if v]:
        parts = spec.split(":")
        decoder, batch, switch_ms = parts[0], int(parts[1]), float(parts[2])
        cfg_decoder = decoder.partition("-")[0]
        delta = "delta" in parts[3:]
        nhwc = "nchw" not in parts[3:]
        sys.setswitchinterval(switch_ms / 1000 if switch_ms > 0 else default_switch)
        cfg = replay_config(args.cameras, batch, max_wait_ms=2, delta=delta, queue_size=4,
                            model=ModelConfig(path=model_path, precision="fp16", gpu_decoder=cfg_decoder))
        try:
            stages = CudaStages(0)
            eng = OrtCudaEngine(model, max_batch=batch, fp16=True, stream=stages.infer, nhwc=nhwc)
            name, _, kinds = decoder.partition("-")
            choice = _gpu_choice(eng, cfg.model, batch, f"gpu:{name}+onnxruntime", "tune", stages)
            if kinds:  # nvimgcodec-hw | -gpu | -hybrid: that decoder with those nvImageCodec backends
                from daemon.gpu.nvimgcodec_decode import NvImgCodecDecoder

                dec = NvImgCodecDecoder(640, batch, dtype=eng.input_dtype, backends=kinds)
                choice = replace(choice, gpu_decoder=dec)
            util = _Util()
            print(f"{spec}: engine ready ({eng.name})", flush=True)

            def changemap(rt: Any) -> tuple[float, int, float]:
                prep = rt._runner._preparer if rt._runner is not None else None
                return (getattr(prep, "changemap_s", 0.0), getattr(prep, "changemap_frames", 0), time.perf_counter())

            run = measure(cfg, choice, frames, args.warmup, args.seconds, stagger=7, during=util.context,
                          probe=changemap)
            n = len(run.latencies)
            lat = sorted(run.latencies)
            fps = n / run.seconds
            stage = dict(run.after.stage_ms)
            busy = {k: round(v * fps / 1000, 2) for k, v in stage.items() if k in ("decode", "infer", "post")}
            line = (f"{spec}: {fps:.0f} frames/s, p50 {lat[n // 2] * 1000:.0f} ms p99 "
                    f"{lat[int(n * 0.99)] * 1000:.0f} ms, stage ms/frame {({k: round(v, 3) for k, v in stage.items()})}"
                    f", busy {busy}, {util.summary()}")
            if delta and run.probe_before is not None:
                s0, n0, _ = run.probe_before
                s1, n1, _ = run.probe_after
                if n1 > n0:
                    per = (s1 - s0) / (n1 - n0)
                    line += (f", change map {per * 1e6:.1f} us/frame = {per * fps * 100:.2f} % of a frame's "
                             f"pipeline time ({n1 - n0} frames)")
                cams = run.after.cameras
                line += (f", decisions full/regions/skip {sum(c.delta_full for c in cams)}/"
                         f"{sum(c.delta_regions for c in cams)}/{sum(c.delta_skip for c in cams)}")
            print(line, flush=True)
            eng.close()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            print(f"{spec}: FAILED {exc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
