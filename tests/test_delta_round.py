"""Planning a round of cameras at once (DeltaTracker.plan_round, policy.seed_boxes, changemap.change_maps_of) gives
what planning them one at a time gives: table-driven on synthetic arrays."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from daemon.delta.changemap import NoiseFloor, change_map_of, change_maps_of
from daemon.delta.policy import DeltaParams, Rect, seed_boxes
from daemon.delta.tracker import DeltaTracker
from daemon.types import Detection, Letterbox


def _one_map(changed: np.ndarray, tile: int, margin: int, c: Rect) -> list[tuple[int, int, int, int]]:
    """regions_from_tiles as it was (one map, its own dilate and labelling), as a sorted list of tuples."""
    if not changed.any():
        return []
    mask = changed.astype(np.uint8)
    if margin > 0:
        mask = np.asarray(cv2.dilate(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)), np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = []
    for x, y, w, h, _a in stats[1:n].tolist():
        r = (max(x * tile, c.x1), max(y * tile, c.y1), min((x + w) * tile, c.x2), min((y + h) * tile, c.y2))
        if r[2] > r[0] and r[3] > r[1]:
            out.append(r)
    return sorted(out, key=lambda r: (r[1], r[0], r[2], r[3]))


@pytest.mark.parametrize("margin", [0, 1, 2, 3])
def test_stacked_maps_give_each_maps_own_groups(margin: int) -> None:
    rng = np.random.default_rng(margin)
    for trial in range(150):
        n, ty, tx = int(rng.integers(1, 17)), int(rng.integers(1, 30)), int(rng.integers(1, 30))
        maps = rng.random((n, ty, tx)) < rng.choice([0.01, 0.05, 0.2, 0.6])
        if trial % 4 == 0:  # changes on the first and last rows: a band's dilation must not reach its neighbour
            maps[:, 0, :: 3] = True
            maps[:, -1, 1::4] = True
        tile = int(rng.choice([16, 32]))
        contents = [Rect(int(rng.integers(0, 40)), int(rng.integers(0, 90)), tx * tile - int(rng.integers(0, 40)),
                         ty * tile - int(rng.integers(0, 90))) for _ in range(n)]
        got = seed_boxes(maps, tile, margin, [(c.x1, c.y1, c.x2, c.y2) for c in contents])
        for k in range(n):
            assert sorted(got[k], key=lambda r: (r[1], r[0], r[2], r[3])) == \
                _one_map(maps[k], tile, margin, contents[k]), (trial, k)
            assert [(r[1], r[0]) for r in got[k]] == sorted((r[1], r[0]) for r in got[k])


def test_batched_change_maps_match_one_at_a_time() -> None:
    rng = np.random.default_rng(1)
    for trial in range(300):
        n, shape = int(rng.integers(1, 17)), (int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        scores = (rng.random((n, *shape)) * rng.choice([5, 10, 20])).astype(np.float32)
        if trial % 7 == 0:
            scores[0, 0, 0] = np.nan
        if trial % 5 == 0:  # exactly on a threshold: compared in float32 either way
            scores[:, :] = np.float32(6.0)
        floors = (rng.random(n) * 4).tolist()
        a = [NoiseFloor(value=v) for v in floors]
        b = [NoiseFloor(value=v) for v in floors]
        got = change_maps_of(scores, [0.5] * n, a)
        for k in range(n):
            want = change_map_of(scores[k].copy(), 0.5, b[k])
            assert np.array_equal(want.changed, got[k].changed) and want.n_changed == got[k].n_changed
            assert (want.threshold, want.brightness_shift) == (got[k].threshold, got[k].brightness_shift)
            assert repr(a[k].value) == repr(b[k].value), (trial, k)


LB = Letterbox(scale=640 / 768, pad_x=0.0, pad_y=80.0, src_w=768, src_h=576)


def test_a_round_plans_as_its_frames_one_after_another() -> None:
    """Cameras with different tiles, margins, re-checks and ghosts, one off, random movers: the same verdicts
    (regions included) and the same exported state frame after frame."""
    rng = np.random.default_rng(5)
    params = [DeltaParams(), DeltaParams(tile=32, margin_tiles=0, align=1, merge_gap=8),
              DeltaParams(recheck_frames=3, recheck_score=0.5, ghost_frames=2, keyframe_frames=40),
              DeltaParams(margin_tiles=2, keyframe_frames=25), DeltaParams(tile=48, align=1)]
    names = [f"c{k}" for k in range(len(params))] + ["off"]
    trackers = [DeltaTracker(), DeltaTracker()]
    for tr in trackers:
        for name, p in zip(names, params, strict=False):
            tr.configure(name, p)
    base = np.full((80, 80), 114, np.uint8)
    base[10:70] = rng.integers(40, 200, (60, 80), dtype=np.uint8)
    sigs = {n: base.copy() for n in names}
    for step in range(60):
        now = step / 10
        for n in names:
            for _ in range(int(rng.integers(0, 4))):  # movers
                y, x = int(rng.integers(10, 66)), int(rng.integers(0, 76))
                sigs[n][y : y + 4, x : x + 4] = rng.integers(0, 255, (4, 4), dtype=np.uint8)
        frames = [sigs[n].copy() for n in names]
        one = [trackers[0].plan(n, s, LB, now) for n, s in zip(names, frames, strict=True)]
        both = trackers[1].plan_round(names, frames, [LB] * len(names), now)
        assert [(v.decision, v.reason, v.regions) for v in one] == [(v.decision, v.reason, v.regions) for v in both]
        for n, v1, v2 in zip(names, one, both, strict=True):
            dets = [Detection(0, "p", float(rng.choice([0.3, 0.9])), float(x), float(y), float(x) + 40, float(y) + 80)
                    for x, y in rng.integers(0, 700, (int(rng.integers(0, 4)), 2)).tolist()]
            out1 = trackers[0].resolve(n, v1, dets, LB, now)
            out2 = trackers[1].resolve(n, v2, dets, LB, now)
            assert out1 == out2
            if n != "off":
                s1, s2 = (tr.export_state(n, now, wait_s=0.0) for tr in trackers)
                assert (s1.policy, s1.noise_floor, s1.detections) == (s2.policy, s2.noise_floor, s2.detections)
                assert s1.signature is not None and s2.signature is not None
                assert np.array_equal(np.asarray(s1.signature), np.asarray(s2.signature))


def test_a_camera_twice_in_a_round_is_refused() -> None:
    tr = DeltaTracker()
    tr.configure("a", DeltaParams())
    sig = np.zeros((80, 80), np.uint8)
    with pytest.raises(ValueError, match="twice"):
        tr.plan_round(["a", "a"], [sig, sig], [LB, LB], 0.0)
