"""Where the time goes on the GPU path (a diagnostic for the device machine, not a benchmark):
1. engine.infer per batch size (every bucket), timed after warm-up;
2. the daemon runtime on N replayed vtest cameras for a few seconds, with and without delta caching, while a
   sampler thread records what each pipeline thread is executing every 5 ms (a poor man's profiler).
Usage: python3 tools/gpu_probe.py [--decoder nvimgcodec] [--cameras 16] [--seconds 6]"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
import traceback
from typing import Any


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decoder", default="nvimgcodec")
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--modes", default="plain,delta",
                    help="plain | delta (the runner always runs the full batch shape since 2026-11-28; the recorded "
                    "plain-nostage/delta/delta-fixed runs predate that)")
    args = ap.parse_args()
    import cupy

    from daemon.app import Runtime
    from daemon.backend import build_engine
    from daemon.bench.replay import LatencyCounter, replay_config, replay_sources
    from daemon.config.model import ModelConfig
    from daemon.gpu.bench import vtest_jpegs
    from daemon.models.fetch import ensure

    frames = vtest_jpegs(ensure("vtest"), 120, "native")
    model_path = str(ensure("yolov8n"))
    for mode in args.modes.split(","):
        delta = mode.startswith("delta")
        model = ModelConfig(path=model_path, precision="fp16", gpu_decoder=args.decoder)
        cfg = replay_config(args.cameras, args.batch, max_wait_ms=2, delta=delta, queue_size=4, model=model)
        t0 = time.perf_counter()
        choice = build_engine(cfg.model, args.batch)
        calls: list[tuple[float, float, int]] = []
        real_infer = choice.engine.infer

        def timed_infer(x: Any, real: Any = real_infer, calls: list[tuple[float, float, int]] = calls) -> Any:
            t0 = time.perf_counter()
            cupy.cuda.get_current_stream().synchronize()  # the pre stage's device work this batch waits for
            t1 = time.perf_counter()
            out = real(x)
            calls.append((t1 - t0, time.perf_counter() - t1, int(x.shape[0])))
            return out

        engine: Any = choice.engine  # the GPU engine (OrtCudaEngine): its infer is timed from here on
        engine.infer = timed_infer
        built = time.perf_counter() - t0
        print(f"\n=== {mode}: engine built in {built:.1f} s ({choice.engine.name})", flush=True)
        if mode == "plain":
            x = cupy.zeros((args.batch, 3, 640, 640), engine.input_dtype)
            stages: Any = choice.sync  # daemon.gpu.streams.CudaStages
            with stages.streams["infer"]:
                for n in (1, 2, 3, 4, 8, 16, 32):
                    choice.engine.infer(x[:n])
                    t = time.perf_counter()
                    for _ in range(10):
                        choice.engine.infer(x[:n])
                    print(f"infer n={n}: {(time.perf_counter() - t) / 10 * 1000:.2f} ms", flush=True)

        counter = LatencyCounter()
        rt = Runtime(cfg, [counter], engine=choice, source_factory=replay_sources(frames, stagger=7))
        rt.start()
        samples: collections.Counter[str] = collections.Counter()
        stop = threading.Event()
        batches: list[int] = []

        def sampler(stop: threading.Event = stop, samples: collections.Counter[str] = samples) -> None:
            while not stop.wait(0.005):
                names = {t.ident: t.name for t in threading.enumerate()}
                for ident, frame in sys._current_frames().items():
                    name = names.get(ident, "?")
                    if not name.startswith("pipeline:"):
                        continue
                    st = traceback.extract_stack(frame)[-4:]
                    samples[name + " | " + " < ".join(f"{s.name}:{s.lineno}" for s in reversed(st))] += 1

        time.sleep(3.0)
        counter.measuring = True
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        b0 = rt._runner.batches if rt._runner else 0
        t0 = time.monotonic()
        time.sleep(args.seconds)
        counter.measuring = False
        stop.set()
        dt = time.monotonic() - t0
        nb = (rt._runner.batches if rt._runner else 0) - b0
        snap = rt.stats.snapshot([], 1.0)
        rt.stop(15)
        choice.engine.close()
        print(f"frames/s {len(counter.latencies) / dt:.0f}, batches {nb} ({len(counter.latencies) / max(nb, 1):.1f} "
              f"frames each), stage ms {dict(snap.stage_ms)}", flush=True)
        print("delta decisions", sum(c.delta_full for c in snap.cameras), sum(c.delta_regions for c in snap.cameras),
              sum(c.delta_skip for c in snap.cameras))
        total = sum(samples.values()) or 1
        for k, v in samples.most_common(8):
            print(f"{v / total:6.1%} {k}")
        del batches
        if calls:
            import numpy as np

            c = np.asarray(calls[-40:])
            rows = sorted(set(c[:, 2].astype(int).tolist()))
            print(f"last {len(c)} infer calls: wait for pre work {c[:, 0].mean() * 1000:.1f} ms, onnxruntime "
                  f"{c[:, 1].mean() * 1000:.1f} ms (max {c[:, 1].max() * 1000:.1f}), rows {rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
