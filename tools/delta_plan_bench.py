"""Host cost of delta caching's per-frame work: DeltaTracker.plan, fit_regions and DeltaTracker.resolve, as the
GPU path runs them (16 cameras, 64-frame batches, tile scores given), the post stage (decoded rows -> published
boxes, daemon.pipeline.post, resolve included), and the GPU preparer's host-side fill (gpu_layout:
daemon.gpu.prepare.lay_out, fit_regions included; no device needed), on vtest (daemon.delta.planbench).

    DELTAYOLO_CACHE=.devcache python3 tools/delta_plan_bench.py [--batches 50] [--repeat 5] [--profile] [--per-frame]
    # "plan" times DeltaTracker.plan_round per round of 16 cameras (the GPU path); --per-frame: plan per frame
    # (the CPU path). An older tree, for a before/after on this machine (run it from there, same cache):
    git archive f882718 | tar x -C /tmp/base && (cd /tmp/base && python3 tools/delta_plan_bench.py)
    # the post stage of an older runner.py (its PipelineRunner._detections) next to today's, same replay:
    git show 0fe9716:daemon/pipeline/runner.py > /tmp/old_runner.py
    python3 tools/delta_plan_bench.py --post-baseline /tmp/old_runner.py
    python3 tools/delta_plan_bench.py --record     # rewrite tests/data/delta_plan_expected.json (outputs pinned)
    python3 tools/delta_plan_bench.py --make-inputs  # re-record tests/data/delta_plan_inputs.json (runs YOLOv8n)

Prints microseconds per frame for each call (median and spread over the repeats).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon.delta.planbench import SCENARIOS, digest, inputs_digest, load_inputs, replay, replay_post  # noqa: E402
from daemon.delta.policy import DeltaParams  # noqa: E402
from daemon.models.fetch import ensure  # noqa: E402
from daemon.pipeline.post import BatchDetections, PostFactory  # noqa: E402

INPUTS = REPO / "tests" / "data" / "delta_plan_inputs.json"
EXPECTED = REPO / "tests" / "data" / "delta_plan_expected.json"


def make_inputs(count: int) -> None:
    """YOLOv8n (FP32, onnxruntime CPU, conf 0.25, iou 0.7) on the first ``count`` vtest frames."""
    import cv2
    import numpy as np

    from daemon.decode.letterbox import letterbox_into
    from daemon.inference.model import load_model
    from daemon.inference.onnxrt import OnnxRuntimeEngine
    from daemon.inference.yolo import decode_output, to_detections

    model = load_model(ensure("yolov8n"))
    engine = OnnxRuntimeEngine(model, 8)
    cap = cv2.VideoCapture(str(ensure("vtest")))
    frames: list[list[list[int]]] = []
    names: dict[str, str] = {}
    buf = np.empty((1, 3, 640, 640), np.float32)
    while len(frames) < count:
        ok, img = cap.read()
        if not ok:
            break
        lb = letterbox_into(np.asarray(img, np.uint8), 640, buf[0])
        arr = decode_output(engine.infer(buf), model.layout, 0.25, 0.7)[0]
        dets = to_detections(arr, lb, model.class_names)
        frames.append([[d.class_id, round(d.score * 1000), round(d.x1), round(d.y1), round(d.x2), round(d.y2)]
                       for d in dets])
        names.update({str(d.class_id): d.class_name for d in dets})
    cap.release()
    INPUTS.write_text(json.dumps({"generator": "tools/delta_plan_bench.py --make-inputs (YOLOv8n FP32, CPU, "
                                  "conf 0.25, iou 0.7; score x1000, source px rounded)", "names": names,
                                  "frames": frames}, separators=(",", ":")))
    print(f"wrote {INPUTS} ({len(frames)} frames, {sum(map(len, frames))} boxes)")


def record() -> None:
    inputs = load_inputs(ensure("vtest"), INPUTS)
    out = {}
    for name, sc in SCENARIOS.items():
        trace: list[str] = []
        t = replay(inputs, sc.params, sc.batches, capacity=sc.capacity, hold=sc.hold, trace=trace)
        out[name] = {"batches": sc.batches, "decisions": t.decisions, "sha256": digest(trace)}
        print(name, out[name])
    EXPECTED.write_text(json.dumps({"generator": "tools/delta_plan_bench.py --record",
                                    "inputs_sha256": inputs_digest(inputs), "scenarios": out}, indent=1) + "\n")
    print(f"wrote {EXPECTED}")


def _baseline_post(path: Path) -> PostFactory:
    """The post stage of another runner.py (per frame: its ``PipelineRunner._detections``) as a factory."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("baseline_runner", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)

    def factory(items: Any, decoded: Any, settings_of: Any, names: Any, delta: Any, clock: Any) -> Any:
        runner = mod.PipelineRunner.__new__(mod.PipelineRunner)
        runner._settings, runner._names, runner._delta = types.SimpleNamespace(get=settings_of), names, delta
        setattr(mod, "time", types.SimpleNamespace(monotonic=clock, perf_counter=time.perf_counter))  # noqa: B010
        return lambda k: runner._detections(items[k], decoded)

    return factory


def bench(batches: int, repeat: int, profile: bool, baseline: Path | None = None, per_frame: bool = False) -> None:
    inputs = load_inputs(ensure("vtest"), INPUTS)
    params = DeltaParams()
    replay(inputs, params, 2)  # warm-up (imports, caches)
    rows: dict[str, list[float]] = {"plan": [], "fit_regions": [], "resolve": [], "total": [], "post": [],
                                    "gpu_layout": []}
    factories: dict[str, PostFactory] = {"post": BatchDetections}
    if baseline is not None:
        rows["post_baseline"] = []
        factories["post_baseline"] = _baseline_post(baseline)
    for f in factories.values():
        replay_post(inputs, params, 2, f)
    decisions: dict[str, int] = {}
    for _ in range(repeat):
        t = replay(inputs, params, batches, per_frame=per_frame)
        us = 1e6 / t.frames
        rows["plan"].append(t.plan_s * us)
        rows["fit_regions"].append(t.fit_s * us)
        rows["resolve"].append(t.resolve_s * us)
        rows["total"].append((t.plan_s + t.fit_s + t.resolve_s) * us)
        decisions = t.decisions
        rows["gpu_layout"].append(replay(inputs, params, batches, per_frame=per_frame, gpu_layout=True).fit_s * us)
        for name, f in factories.items():  # the post stage's own replay (its resolve is inside it)
            tp = replay_post(inputs, params, batches, f)
            rows[name].append(tp.post_s * 1e6 / tp.frames)
    print(f"16 cameras, batch 64, {batches} batches ({batches * 64} frames) x {repeat}; decisions {decisions}")
    print(f"{'us per frame':>14} {'median':>9} {'min':>9} {'max':>9}")
    for name, v in rows.items():
        print(f"{name:>14} {statistics.median(v):9.1f} {min(v):9.1f} {max(v):9.1f}")
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        replay(inputs, params, batches, per_frame=per_frame)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also print a cProfile of one run (by own time)")
    p.add_argument("--post-baseline", type=Path, default=None, metavar="RUNNER_PY",
                   help="also time the post stage of this (older) daemon/pipeline/runner.py on the same replay")
    p.add_argument("--per-frame", action="store_true", help="plan frame by frame (DeltaTracker.plan, the CPU path)")
    p.add_argument("--record", action="store_true", help="rewrite the pinned outputs (tests/data)")
    p.add_argument("--make-inputs", type=int, metavar="FRAMES", nargs="?", const=200, default=None,
                   help="re-record the YOLOv8n detections of the first FRAMES vtest frames")
    a = p.parse_args()
    if a.make_inputs:
        make_inputs(a.make_inputs)
    elif a.record:
        record()
    else:
        bench(a.batches, a.repeat, a.profile, a.post_baseline, a.per_frame)


if __name__ == "__main__":
    main()
