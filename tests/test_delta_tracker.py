"""Delta tracker and region shaping: stride-aligned regions, cached boxes pulled in whole, re-checks of
low-score boxes, and a confidence threshold raised at run time dropping cached boxes at once."""

from __future__ import annotations

import numpy as np

from daemon.delta.packing import pack
from daemon.delta.policy import Decision, DeltaParams, Rect, shape_regions
from daemon.delta.tracker import DeltaTracker, to_input
from daemon.types import Detection, Letterbox

LB = Letterbox(scale=640 / 768, pad_x=0.0, pad_y=80.0, src_w=768, src_h=576)  # 768x576 into 640x640
CONTENT = Rect(0, 80, 640, 560)


def _sig(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sig = np.full((80, 80), 114, np.uint8)
    sig[10:70, :] = rng.integers(40, 200, (60, 80), dtype=np.uint8)
    return sig


def _tracker(params: DeltaParams, boxes: list[Detection]) -> DeltaTracker:
    tr = DeltaTracker()
    tr.configure("c", params)
    v = tr.plan("c", _sig(), LB, 0.0)
    assert v.decision is Decision.FULL
    tr.resolve("c", v, boxes, LB, 0.0)
    return tr


def test_regions_snap_to_the_stride_grid_and_pull_touched_boxes_in_whole() -> None:
    p = DeltaParams(context_px=16, merge_gap=16, align=32)
    seed = Rect(320, 224, 352, 256)
    box = Rect(340, 200, 380, 300)  # a person the change touches, reaching out of the changed tiles
    far = Rect(40, 400, 80, 480)  # untouched: stays out
    (r,) = shape_regions([seed], [box, far], [], p, CONTENT)
    assert r.x1 <= box.x1 - 16 and r.y1 <= box.y1 - 16 and r.x2 >= box.x2 + 16 and r.y2 >= box.y2 + 16
    assert all(v % 32 == 0 for v in (r.x1, r.y1, r.x2, r.y2))
    assert r.x1 > far.x2


def test_packing_keeps_the_grid_phase() -> None:
    sizes = [(96, 160), (64, 64), (192, 96), (32, 32)]
    placements, _ = pack(sizes, 640, gap=8, align=32)
    assert all(p.x % 32 == 0 and p.y % 32 == 0 for p in placements)


def test_raised_confidence_drops_cached_boxes_at_once() -> None:
    boxes = [Detection(0, "person", 0.9, 100, 100, 140, 200), Detection(0, "person", 0.3, 400, 100, 440, 200)]
    tr = _tracker(DeltaParams(), boxes)
    v = tr.plan("c", _sig(), LB, 0.1)
    assert v.decision is Decision.SKIP
    assert len(tr.resolve("c", v, [], LB, 0.1)[0]) == 2
    tr.set_confidence("c", 0.5)
    v = tr.plan("c", _sig(), LB, 0.2)
    assert v.decision is Decision.SKIP  # raising the threshold needs no keyframe ...
    out, _ = tr.resolve("c", v, [], LB, 0.2)
    assert [d.score for d in out] == [0.9]  # ... the box under it is gone on the very next frame
    tr.set_confidence("c", 0.2)
    assert tr.plan("c", _sig(), LB, 0.3).decision is Decision.FULL  # lowered: a keyframe shows what was hidden


def test_low_score_boxes_are_rechecked_and_vanished_ones_watched() -> None:
    low = Detection(14, "bird", 0.27, 30, 110, 50, 140)
    tr = _tracker(DeltaParams(recheck_score=0.4, ghost_frames=3), [low, Detection(0, "person", 0.9, 300, 100, 340,
                                                                                       200)])
    v = tr.plan("c", _sig(), LB, 0.1)  # nothing changed, but the low-score box is due
    assert v.decision is Decision.REGIONS and len(v.regions) == 1
    r, b = v.regions[0], to_input(low, LB)
    assert r.x1 <= b.x1 and r.y1 <= b.y1 and r.x2 >= b.x2 and r.y2 >= b.y2
    out, _ = tr.resolve("c", v, [], LB, 0.1)  # re-inferred and not found: it goes, its place stays watched
    assert [d.class_name for d in out] == ["person"]
    decisions = []
    for k in range(5):
        v = tr.plan("c", _sig(), LB, 0.2 + k / 10)
        decisions.append(v.decision)
        tr.resolve("c", v, [], LB, 0.2 + k / 10)
    assert decisions[:3] == [Decision.REGIONS] * 3 and decisions[-1] is Decision.SKIP
    snap = tr.snapshot("c")
    assert snap is not None and snap.cached_boxes == 1 and snap.reference_bytes >= 80 * 80


def test_stats_and_metrics_carry_delta_decisions_fraction_and_reference_memory() -> None:
    from prometheus_client import generate_latest

    from daemon.httpserver.metrics import build_registry
    from daemon.stats.collector import SourceCounters, StatsCollector

    tr = _tracker(DeltaParams(), [Detection(0, "person", 0.9, 100, 100, 140, 200)])
    clock = iter(float(t) for t in range(100))
    stats = StatsCollector("cpu:test", "test", clock=lambda: next(clock))
    stats.add_camera("c")
    stats.set_delta_probe(lambda c: (s.reference_bytes if (s := tr.snapshot(c)) else None))
    snap = stats.snapshot([SourceCounters("c", 0, 0, 0, 0, None)], 5.0)
    (cam,) = snap.cameras
    assert cam.delta_reference_bytes >= 80 * 80

    class _P:
        def latest_stats(self) -> object:
            return snap

    text = generate_latest(build_registry(_P())).decode()  # type: ignore[arg-type]
    assert 'deltayolo_camera_delta_decisions_total{camera="c",decision="skip"}' in text
    assert 'deltayolo_camera_inferred_fraction{camera="c"}' in text
    assert f'deltayolo_camera_delta_reference_bytes{{camera="c"}} {float(cam.delta_reference_bytes)}' in text


def test_set_thresholds_command_reaches_the_tracker() -> None:
    from daemon.commands import RuntimeCommands
    from daemon.pipeline.settings import CameraSettings, SettingsBoard
    from daemon.publish.commands import SetThresholds

    tr = _tracker(DeltaParams(), [Detection(0, "person", 0.9, 100, 100, 140, 200),
                                  Detection(0, "person", 0.3, 400, 100, 440, 200)])

    class _Rt:
        delta = tr
        settings = SettingsBoard()

    _Rt.settings.set(CameraSettings("c", 0.25, 0.7, 100, None, None, ()))
    out = RuntimeCommands(_Rt()).handle(SetThresholds(camera="c", confidence=0.5, iou=None))  # type: ignore[arg-type]
    assert out.ok
    v = tr.plan("c", _sig(), LB, 0.1)
    assert [d.score for d in tr.resolve("c", v, [], LB, 0.1)[0]] == [0.9]


def _regions_frame(tr: DeltaTracker, region: Rect) -> object:
    """A REGIONS verdict over ``region`` (model-input pixels), planned like any frame."""
    from daemon.delta.policy import Verdict

    tr.plan("c", _sig(), LB, 0.1)  # in flight: resolved below under the verdict we hand in
    return Verdict(Decision.REGIONS, "test", (region,))


VAN = Detection(7, "truck", 0.65, 652, 44, 723, 100)  # vtest's parked van, source pixels
VAN_REGION = Rect(512, 96, 640, 192)  # model input: holds the van whole (x 543-603, y 117-164)


def test_a_crop_does_not_relabel_a_known_object() -> None:
    tr = _tracker(DeltaParams(), [VAN])
    car = Detection(2, "car", 0.58, 652, 44, 724, 100)  # the crop names the van "car" only
    out, _ = tr.resolve("c", _regions_frame(tr, VAN_REGION), [car], LB, 0.1)
    assert [(d.class_name, d.cached) for d in out] == [("truck", True)]
    both = [Detection(7, "truck", 0.6, 651, 44, 723, 100), car]  # "truck" and a second label "car"
    out, _ = tr.resolve("c", _regions_frame(tr, VAN_REGION), both, LB, 0.2)
    assert [(d.class_name, d.cached) for d in out] == [("truck", False)]
    off = _tracker(DeltaParams(label_iou=0.0), [VAN])  # off: the crop's label replaces the whole frame's
    out, _ = off.resolve("c", _regions_frame(off, VAN_REGION), [car], LB, 0.1)
    assert [d.class_name for d in out] == ["car"]


def test_a_new_label_on_a_moved_box_or_a_known_pair_is_kept() -> None:
    person = Detection(0, "person", 0.9, 660, 40, 700, 100)
    tr = _tracker(DeltaParams(), [VAN, Detection(2, "car", 0.4, 652, 44, 723, 100)])  # the whole frame said both
    car = Detection(2, "car", 0.5, 652, 44, 724, 100)
    out, _ = tr.resolve("c", _regions_frame(tr, VAN_REGION), [VAN, car, person], LB, 0.1)
    assert sorted(d.class_name for d in out) == ["car", "person", "truck"]


def test_a_box_cut_by_a_crop_edge_keeps_the_cached_box() -> None:
    person = Detection(0, "person", 0.89, 178, 406, 260, 556)  # model input y 418-544
    region = Rect(128, 352, 320, 544)  # holds the cached box wholly; the person now reaches past its bottom
    cut = Detection(0, "person", 0.91, 178, 408, 259, 555)
    tr = _tracker(DeltaParams(), [person])
    out, _ = tr.resolve("c", _regions_frame(tr, region), [], LB, 0.1, cut=[cut])
    assert [(d.score, d.cached) for d in out] == [(0.89, True)]
    off = _tracker(DeltaParams(keep_cut=False), [person])  # off: "seen again" inside the region, and gone
    assert off.resolve("c", _regions_frame(off, region), [], LB, 0.1, cut=[cut])[0] == ()


def test_an_unsure_label_may_be_renamed_by_a_crop() -> None:
    unsure = Detection(7, "truck", 0.31, 733, 50, 768, 97)  # vtest's other vehicle: car/truck at 0.26-0.55
    tr = _tracker(DeltaParams(), [unsure])
    car = Detection(2, "car", 0.45, 733, 50, 768, 96)
    out, _ = tr.resolve("c", _regions_frame(tr, Rect(576, 96, 640, 192)), [car], LB, 0.1)
    assert [(d.class_name, d.cached) for d in out] == [("car", False)]
