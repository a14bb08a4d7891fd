"""delta.mode features on the GPU path (CuPy, onnxruntime-gpu; run on the GPU machine): the backbone and head
run with the CUDA EP on device arrays, the reference maps stay on the device, REGIONS frames splice there; the
detections follow a camera inferring every frame, and a camera exported from one GPU runtime and imported into
another continues like one that stayed. Timings are printed. The CPU-side parts: tests/test_features_stage.py."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_helpers import ResultCollector, boxes_found, vtest_jpegs

from daemon.config.loader import parse_config
from daemon.config.model import Config
from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.delta.policy import Rect
from daemon.features.split import relative_difference, split_model
from daemon.features.state import from_bytes
from daemon.inference.model import load_model
from daemon.inference.yolo import decode_output
from daemon.sources.replay import load_jpeg_frames

pytestmark = pytest.mark.gpu

MATCH = {"fp32": 0.95, "fp16": 0.93}  # share of every-frame boxes a features camera finds (IoU > 0.7); CPU: 0.996


@pytest.fixture(scope="module")
def frames(vtest_path: Path) -> list[bytes]:
    return vtest_jpegs(vtest_path, 40)


def _on_device(a: Any) -> bool:
    return hasattr(a, "__cuda_array_interface__")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_features_mode_on_the_gpu_follows_every_frame_inference(model_path: Path, frames: list[bytes],
                                                                precision: str) -> None:
    """The GPU twin of tests/test_features_live.py: a features camera and a camera inferring every frame share
    batches (engine rows and features rows in one batch); the features camera's REGIONS frames find the
    every-frame camera's boxes; its reference maps are device arrays and travel with an export."""
    from daemon.app import Runtime
    from daemon.backend import build_engine
    from daemon.sources.replay import ReplaySource as ReplayReader

    cfg = parse_config(
        "version: 1\nnode: {site: g, area: g, line: g, node: g}\n"
        f"model: {{path: {model_path}, precision: {precision}}}\ncameras:\n"
        "  - id: feat\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        "    delta: {enabled: true, mode: features, feature_stream: true}\n"
        "  - id: every\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        "batching: {max_batch: 4, max_wait_ms: 5}\nstats: {interval_s: 100}\n"
    )
    choice = build_engine(cfg.model, cfg.batching.max_batch)
    assert choice.backend.startswith("gpu:"), choice.backend
    sink = ResultCollector()
    rt = Runtime(cfg, [sink], engine=choice, source_factory=lambda cam, to: ReplayReader(
        cam.id, "t", to, loop=False, realtime=False, frames=frames))
    t0 = time.perf_counter()
    rt.start()
    try:
        stage = rt.feature_stage
        assert stage is not None, "the GPU feature stage was not built (see the log: demoted to crops mode)"
        started = time.perf_counter()
        deadline = time.monotonic() + 240
        while not rt.all_ended() and time.monotonic() < deadline:
            time.sleep(0.05)
        ran = time.perf_counter() - started
        time.sleep(0.5)
        assert rt.feature_cache is not None
        maps = rt.feature_cache.get("feat")
        assert maps is not None and all(_on_device(m) for m in maps)  # the reference lives on the device
        map_dtype = np.dtype(maps[0].dtype)
        t = time.perf_counter()
        data = rt.export_camera("feat")
        export_ms = (time.perf_counter() - t) * 1e3
        stats = {c.camera: c for c in rt.stats.snapshot([], 1.0).cameras}
    finally:
        rt.stop(20)
        choice.engine.close()
    state = from_bytes(data, time.monotonic())
    assert len(state.features) == 3 and state.signature is not None
    assert all(np.dtype(f.dtype) == map_dtype for f in state.features)
    assert [f.shape for f in state.features] == [(64, 80, 80), (128, 40, 40), (256, 20, 20)]
    feat = stats["feat"]
    assert feat.bytes_h2d == feat.bytes_in  # only the JPEG bytes go up; maps never leave the device per frame
    assert 0 < feat.feature_delta_bytes < 0.4 * feat.feature_full_bytes
    by = {(r.camera, r.seq): r for r in sink.results}
    assert sum(1 for k in by if k[0] == "feat") == len(frames) == sum(1 for k in by if k[0] == "every")
    decisions = [by[("feat", i)].decision for i in range(len(frames))]
    regions = [by[("feat", i)] for i in range(len(frames)) if by[("feat", i)].decision == "regions"]
    assert len(regions) >= len(frames) // 3, decisions
    matched = total = 0
    for r in regions:
        assert 0.3 < r.inferred_fraction <= 1.0  # the head always; the backbone on the (bucketed) crops
        assert not r.cached
        total += len(by[("every", r.seq)].detections)
        matched += boxes_found(list(by[("every", r.seq)].detections), list(r.detections))
    work = float(np.mean([r.inferred_fraction for r in regions]))
    print(f"\n[{precision}] {choice.backend}: maps {map_dtype.name} on the device ({stage.runner.bucket} px crop "
          f"buckets); decisions {decisions}\n[{precision}] regions frames {len(regions)}/{len(frames)}, every-frame "
          f"boxes found {matched}/{total}, mean work {work:.0%}; features rows {stage.rows} at "
          f"{1e3 * stage.busy_s / max(stage.rows, 1):.2f} ms each (feature stage, incl. the codec's copy down); "
          f"{2 * len(frames)} frames in {ran:.2f} s after a {started - t0:.2f} s start; export "
          f"{len(data)} bytes in {export_ms:.2f} ms; feature stream {feat.feature_delta_bytes} of "
          f"{feat.feature_full_bytes} FP32 bytes ({feat.feature_delta_bytes / max(feat.feature_full_bytes, 1):.1%})")
    assert work < 1.0
    assert total > 50 and matched / total > MATCH[precision], (matched, total)


class _Feed:
    """Runtimes whose cameras are fed one JPEG at a time (cluster.movecheck's ManualSource)."""

    def __init__(self) -> None:
        self.sources: dict[tuple[str, str], Any] = {}

    def factory(self, rt: str) -> Callable[[Any, Callable[[Any], object]], Any]:
        from cluster.movecheck import ManualSource

        def make(cam: Any, sink: Callable[[Any], object]) -> Any:
            src = ManualSource(cam.id, sink)
            self.sources[(rt, cam.id)] = src
            return src
        return make


def _move_cfg(model_path: Path, precision: str, cameras: list[str]) -> Config:
    cams = "".join(f"  - id: {c}\n    source: {{type: replay, path: x.avi, realtime: false, loop: false}}\n"
                   for c in cameras)
    return parse_config(
        "version: 1\nnode: {site: m, area: m, line: m, node: m}\n"
        f"model: {{path: {model_path}, precision: {precision}}}\ncameras:\n{cams}"
        "batching: {max_batch: 1, max_wait_ms: 1}\nstats: {interval_s: 100}\n"
        # keyframes by frame count only (both runtimes see the same frames at different times), none after the move
        "delta: {enabled: true, mode: features, keyframe_frames: 60, keyframe_s: 3600}\n"
    )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_features_camera_exported_on_the_gpu_continues_like_one_that_stayed(model_path: Path, frames: list[bytes],
                                                                             precision: str) -> None:
    """Runtime A runs ``stay`` and ``move`` (features mode) on frames 0-11, one frame at a time; ``move``'s
    state (device maps copied down into DYCS bytes) is imported into runtime B (host bytes -> device maps on its
    first REGIONS frame); frames 12-23 then give B's ``move`` exactly A's ``stay`` decisions and detections,
    while B's ``cold`` (no state) starts with a FULL frame."""
    from cluster.movecheck import Collector, compare
    from daemon.app import Runtime

    split, n = 12, 24
    feed = _Feed()
    ca, cb = Collector(), Collector()
    a = Runtime(_move_cfg(model_path, precision, ["stay", "move"]), [ca], source_factory=feed.factory("a"))
    b = Runtime(_move_cfg(model_path, precision, ["move", "cold"]), [cb], source_factory=feed.factory("b"))
    a.start()
    b.start()
    try:
        assert a.feature_stage is not None and b.feature_stage is not None
        for i in range(split):
            for cam in ("stay", "move"):
                feed.sources[("a", cam)].push(frames[i])
                ca.wait(cam, i + 1)
        assert a.feature_cache is not None and all(_on_device(m) for m in a.feature_cache.get("move") or [None])
        t = time.perf_counter()
        data = a.export_camera("move", wait_s=5.0)
        export_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        b.import_camera("move", data)
        import_ms = (time.perf_counter() - t) * 1e3
        for i in range(split, n):
            feed.sources[("a", "stay")].push(frames[i])
            ca.wait("stay", i + 1)
            for cam in ("move", "cold"):
                feed.sources[("b", cam)].push(frames[i])
                cb.wait(cam, i - split + 1)
        moved_maps = b.feature_cache.get("move") if b.feature_cache is not None else None
    finally:
        a.stop(20)
        b.stop(20)
    state = from_bytes(data, time.monotonic())
    assert len(state.features) == 3 and state.policy.has_reference
    stay, moved, cold = ca.results["stay"][split:], cb.results["move"], cb.results["cold"]
    d_stay, d_moved = [r.decision for r in stay], [r.decision for r in moved]
    same, box, score = True, 0.0, 0.0
    for s, m in zip(stay, moved, strict=True):
        eq, db, ds = compare(s.detections, m.detections)
        same &= eq
        box, score = max(box, db), max(score, ds)
    print(f"\n[{precision}] move of a features camera: {len(data)} bytes (maps "
          f"{np.dtype(state.features[0].dtype).name}), export {export_ms:.2f} ms, import {import_ms:.2f} ms; "
          f"decisions stay {d_stay} moved {d_moved} cold {[r.decision for r in cold]}; largest box difference "
          f"{box} px, score {score} (identical: {box == 0.0 and score == 0.0})")
    assert d_moved == d_stay and "regions" in d_moved, (d_stay, d_moved)
    assert cold[0].decision == "full"
    assert moved_maps is not None and all(_on_device(m) for m in moved_maps)  # the imported maps went up
    assert same and box <= 1e-3 and score <= 1e-5, (box, score)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_halves_reproduce_the_model_and_their_timing(model_path: Path, vtest_path: Path,
                                                          precision: str) -> None:
    """The two halves on the CUDA EP give the engine's boxes (the raw outputs' relative difference is printed:
    cuDNN may pick other algorithms, TF32 or FP16, for the halves); a region spliced on the device gives the full
    frame's cells; median times of the engine, a FULL and a REGIONS features frame (batch 1) are printed."""
    import cupy

    from daemon.features.gpu import gpu_runner
    from daemon.gpu.ort_cuda import OrtCudaEngine

    fp16 = precision == "fp16"
    model = load_model(model_path)
    split = split_model(model)
    jpegs = load_jpeg_frames(vtest_path, limit=9)
    x = np.zeros((2, 3, 640, 640), np.float32)
    for row, i in enumerate((0, 8)):
        letterbox_into(decode_jpeg(jpegs[i], 40_000_000), (640, 640), x[row])
    engine = OrtCudaEngine(model, max_batch=1, fp16=fp16, nhwc=fp16)
    runner = gpu_runner(split, 0, None, fp16)
    try:
        dx = cupy.asarray(x).astype(engine.input_dtype)
        want = cupy.asnumpy(engine.infer(dx[1:2]))
        raw, maps_b = runner.full(dx[1:2])
        rel = relative_difference(cupy.asnumpy(raw), want)
        _, maps_a = runner.full(dx[:1])
        ref = [m.copy() for m in maps_a[0]]
        region = Rect(256, 224, 384, 352)
        res = runner.regions(dx[1], ref, [region])
        worst = 0.0
        for tap, got, full, before in zip(split.taps, ref, maps_b[0], maps_a[0], strict=True):
            s = tap.stride
            inner = (slice(None), slice(region.y1 // s, region.y2 // s), slice(region.x1 // s, region.x2 // s))
            g, f = cupy.asnumpy(got).astype(np.float32), cupy.asnumpy(full).astype(np.float32)
            worst = max(worst, float(np.abs(g[inner] - f[inner]).max()) / float(np.abs(f).max()))
            assert bool(cupy.array_equal(got[:, :2], before[:, :2]))  # far from the crop the reference stays

        def median_ms(fn: Callable[[], object]) -> float:
            times = []
            for _ in range(21):
                t = time.perf_counter()
                fn()
                cupy.cuda.get_current_stream().synchronize()
                times.append(time.perf_counter() - t)
            return statistics.median(times[1:]) * 1e3

        t_engine = median_ms(lambda: engine.infer(dx[1:2]))
        t_full = median_ms(lambda: runner.full(dx[1:2]))
        t_regions = median_ms(lambda: runner.regions(dx[1], [m.copy() for m in maps_a[0]], [region]))
    finally:
        engine.close()
    print(f"\n[{precision}] halves vs engine: relative difference {rel:.2e}; spliced region's cells vs the full "
          f"frame's {worst:.2%} of the map peak; maps {np.dtype(runner.map_dtype).name}; crops "
          f"{[(c.width, c.height) for c in res.crops]}"
          f"\n[{precision}] batch 1, median ms: engine {t_engine:.2f}, features FULL {t_full:.2f}, features REGIONS "
          f"(one 128x128 region) {t_regions:.2f} (work {runner.work_fraction(res.crop_pixels):.0%} of a frame)")
    # the halves' boxes are the engine's: every clear engine box (score > 0.35) has one of the same class, close
    eng = decode_output(want, model.layout, 0.25, 0.7)[0]
    mine = decode_output(cupy.asnumpy(raw), model.layout, 0.25, 0.7)[0]
    px, sc = (2.0, 0.03) if fp16 else (1.0, 0.01)
    clear = eng[eng[:, 4] > 0.35]
    assert len(clear) > 3, eng
    for c in clear:
        same = mine[mine[:, 5] == c[5]]
        d = np.abs(same[:, :4] - c[:4]).max(axis=1) if len(same) else np.array([np.inf])
        j = int(np.argmin(d))
        assert d[j] <= px and abs(same[j, 4] - c[4]) <= sc, (c, same)
    assert worst <= (0.05 if fp16 else 0.02), worst
