"""The ranked fidelity view (`deltayolo fidelity --delta`, CameraSettings.rank_floor): boxes under the camera's
confidence down to a floor travel beside the published ones, cached by the region rule, and never change what is
published."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.loader import parse_config
from daemon.delta.policy import Decision, DeltaParams, Rect, Verdict
from daemon.delta.tracker import DeltaTracker
from daemon.inference.model import load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.sources.replay import ReplaySource as ReplayReader
from daemon.types import Detection, Letterbox
from tests.runtime_helpers import ResultCollector, vtest_jpegs

LB = Letterbox(scale=640 / 768, pad_x=0.0, pad_y=80.0, src_w=768, src_h=576)


def _sig() -> np.ndarray:
    sig = np.full((80, 80), 114, np.uint8)
    sig[10:70, :] = np.random.default_rng(0).integers(40, 200, (60, 80), dtype=np.uint8)
    return sig


def test_below_threshold_candidates_follow_the_region_rule() -> None:
    tr = DeltaTracker()
    tr.configure("c", DeltaParams())
    far = Detection(0, "person", 0.12, 10, 200, 40, 280)  # far from the region below
    inside = Detection(0, "person", 0.2, 660, 50, 700, 95)  # wholly inside it
    covered = Detection(2, "car", 0.1, 600, 60, 650, 110)  # reaches past it; a fresh car will cover it
    other = Detection(0, "person", 0.15, 600, 60, 650, 110)  # same place, another class: stays
    v = tr.plan("c", _sig(), LB, 0.0)
    assert v.decision is Decision.FULL
    tr.resolve("c", v, [], LB, 0.0)
    got = tr.resolve_below("c", v, [far, inside, covered, other], [], LB, 0.0)
    assert got == (far, inside, covered, other)
    tr.plan("c", _sig(), LB, 0.1)
    region = Verdict(Decision.REGIONS, "test", (Rect(512, 96, 640, 192),))  # source x 614-768, y 19-134
    fresh_car = Detection(2, "car", 0.4, 615, 62, 652, 108)  # published, centre in the region
    new_low = Detection(0, "person", 0.05, 700, 40, 740, 90)
    tr.resolve("c", region, [fresh_car], LB, 0.1)
    got = tr.resolve_below("c", region, [new_low], [fresh_car], LB, 0.1)
    assert [(d.score, d.cached) for d in got] == [(0.12, True), (0.15, True), (0.05, False)]
    tr.plan("c", _sig(), LB, 0.2)
    skip = Verdict(Decision.SKIP, "test")
    tr.resolve("c", skip, [], LB, 0.2)
    assert [d.score for d in tr.resolve_below("c", skip, [], [], LB, 0.2)] == [0.12, 0.15, 0.05]


def _run(model_path: Path, frames: list[bytes], floor: float | None, delta: bool = True) -> ResultCollector:
    cfg = parse_config(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}}}\ncameras:\n"
        "  - id: a\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n    queue_size: 1\n"
        f"batching: {{max_batch: 1, max_wait_ms: 1}}\ndelta: {{enabled: {str(delta).lower()}}}\n"
        "stats: {interval_s: 100}\n"
    )
    engine = OnnxRuntimeEngine(load_model(model_path), max_batch=1, threads=2)
    sink = ResultCollector()
    rt = Runtime(cfg, [sink], engine=EngineChoice(engine, "cpu:onnxruntime", "test"),
                 source_factory=lambda cam, to: ReplayReader(cam.id, "t", to, loop=False, realtime=False,
                                                             frames=frames))
    rt.settings.rank_floor = floor
    rt.start()
    try:
        deadline = time.monotonic() + 60
        while not rt.all_ended() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        rt.stop(20)
        engine.close()
    return sink


def test_a_rank_floor_adds_candidates_and_changes_nothing_published(model_path: Path, vtest_path: Path) -> None:
    """Delta off, so both runs infer the same whole frames (with delta on, which cached boxes a region pulls in
    depends on how far planning runs ahead of resolving: two plain runs differ as well)."""
    frames = vtest_jpegs(vtest_path, 6)
    a = sorted(_run(model_path, frames, None, delta=False).results, key=lambda r: r.seq)
    b = sorted(_run(model_path, frames, 0.001, delta=False).results, key=lambda r: r.seq)
    assert [r.seq for r in a] == [r.seq for r in b] == list(range(6))
    for x, y in zip(a, b, strict=True):
        assert [(d.class_id, d.score, d.x1, d.y1, d.x2, d.y2) for d in x.detections] == \
            [(d.class_id, d.score, d.x1, d.y1, d.x2, d.y2) for d in y.detections]
        assert x.below == ()
        assert len(y.below) > 20 and all(0.001 < d.score <= 0.25 for d in y.below)


def test_below_candidates_are_cached_through_delta_frames(model_path: Path, vtest_path: Path) -> None:
    results = sorted(_run(model_path, vtest_jpegs(vtest_path, 14), 0.001).results, key=lambda r: r.seq)
    assert [r.seq for r in results] == list(range(14))
    assert "regions" in {r.decision for r in results}
    assert all(d.score > 0.25 for r in results for d in r.detections)
    assert all(r.below and all(0.001 < d.score <= 0.25 for d in r.below) for r in results)
    assert any(d.cached for r in results for d in r.below)  # carried outside the regions
    assert any(not d.cached for r in results if r.decision == "regions" for d in r.below)  # the crops' own
