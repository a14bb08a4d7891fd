"""Delta caching's pure parts on synthetic signatures: change maps, policy edges, regions, packing, merging."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.delta.cache import SourceRect, merge_regions
from daemon.delta.changemap import NoiseFloor, change_map
from daemon.delta.packing import pack
from daemon.delta.policy import CameraDeltaState, Decision, DeltaParams, Rect, decide, regions_from_tiles
from daemon.delta.signature import SIGNATURE_FACTOR
from daemon.types import Detection

CONTENT = Rect(0, 80, 640, 560)  # a 4:3 frame letterboxed into 640x640
P = DeltaParams()


def _scene(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sig = np.full((80, 80), 114, np.uint8)
    sig[10:70, :] = rng.integers(40, 200, (60, 80), dtype=np.uint8)
    return sig


def _noisy(sig: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(sig.astype(np.int16) + rng.integers(-2, 3, sig.shape), 0, 255).astype(np.uint8)


def _verdict(sig: np.ndarray, ref: np.ndarray, state: CameraDeltaState | None = None, now: float = 1.0):
    cmap = change_map(sig, ref, P.tile // SIGNATURE_FACTOR, NoiseFloor())
    return decide(state or CameraDeltaState(True, 3, 0.0, 0), cmap, now, P, CONTENT), cmap


def test_static_scene_skips() -> None:
    ref = _scene()
    v, cmap = _verdict(_noisy(ref, 1), ref)
    assert v.decision is Decision.SKIP
    assert cmap.changed_fraction == 0.0


def test_small_mover_gets_a_region_at_the_right_place() -> None:
    ref = _scene()
    cur = _noisy(ref, 2)
    cur[30:36, 40:44] = 255 - cur[30:36, 40:44]  # an object of 32x48 input pixels at x=320, y=240
    v, _ = _verdict(cur, ref)
    assert v.decision is Decision.REGIONS
    assert len(v.regions) == 1
    r = v.regions[0]
    assert r.x1 <= 320 and r.x2 >= 352 and r.y1 <= 240 and r.y2 >= 288
    assert r.area < 0.15 * CONTENT.area


def test_sudden_scene_change_goes_full() -> None:
    v, _ = _verdict(_scene(seed=9), _scene(seed=0))
    assert v.decision is Decision.FULL


def test_lights_switching_on_goes_full() -> None:
    ref = _scene()
    brighter = np.clip(ref.astype(np.int16) + 45, 0, 255).astype(np.uint8)
    v, _ = _verdict(brighter, ref)
    assert v.decision is Decision.FULL
    assert "brightness" in v.reason


def test_small_global_brightness_drift_is_discounted() -> None:
    ref = _scene()
    v, _ = _verdict(np.clip(ref.astype(np.int16) + 6, 0, 255).astype(np.uint8), ref)
    assert v.decision is Decision.SKIP


@pytest.mark.parametrize(
    ("state", "now", "reason"),
    [
        (CameraDeltaState(False, 0, 0.0, 0), 1.0, "no reference"),
        (CameraDeltaState(True, P.keyframe_frames - 1, 0.0, 0), 1.0, "keyframe due (frames)"),
        (CameraDeltaState(True, 1, 0.0, 0), P.keyframe_s + 0.1, "keyframe due (time)"),
        (CameraDeltaState(True, 1, 0.0, P.drift_tiles), 1.0, "drift bound"),
    ],
)
def test_full_when_due(state: CameraDeltaState, now: float, reason: str) -> None:
    ref = _scene()
    cur = ref.copy()
    cur[30:34, 40:44] = 0
    v, _ = _verdict(cur, ref, state, now)
    assert (v.decision, v.reason) == (Decision.FULL, reason)


def test_regions_merge_and_clip() -> None:
    changed = np.zeros((20, 20), bool)
    changed[5, 5] = changed[5, 7] = True  # two tiles two apart: one region after a 1-tile margin
    changed[15, 15] = True
    regions = regions_from_tiles(changed, 32, 1, CONTENT)
    assert len(regions) == 2
    assert regions[0] == Rect(4 * 32, 4 * 32, 9 * 32, 7 * 32)
    assert regions[1].y2 <= CONTENT.y2


def test_noise_floor_adapts_upwards_for_a_noisy_camera() -> None:
    ref = _scene()
    noise = NoiseFloor()
    rng = np.random.default_rng(3)
    for _ in range(200):
        cur = np.clip(ref.astype(np.int16) + rng.integers(-12, 13, ref.shape), 0, 255).astype(np.uint8)
        change_map(cur, ref, 4, noise)
    assert noise.threshold() > 9.0
    final = change_map(np.clip(ref.astype(np.int16) + rng.integers(-12, 13, ref.shape), 0, 255).astype(np.uint8),
                       ref, 4, noise)
    assert final.changed_fraction < 0.02


def test_packing_shares_canvases_and_never_overlaps() -> None:
    sizes = [(200, 300), (150, 120), (640, 100), (300, 300), (100, 100), (320, 240)]
    placements, n = pack(sizes, 640)
    assert n <= 2
    for c in range(n):
        boxes = [(p.x, p.y, p.x + sizes[p.index][0], p.y + sizes[p.index][1]) for p in placements if p.canvas == c]
        for i, a in enumerate(boxes):
            assert a[2] <= 640 and a[3] <= 640
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    with pytest.raises(ValueError, match="does not fit"):
        pack([(700, 10)], 640)


def _det(x: float, y: float, name: str = "person") -> Detection:
    return Detection(0, name, 0.9, x - 5, y - 5, x + 5, y + 5)


def test_merge_fresh_inside_cached_outside() -> None:
    cached = (_det(10, 10), _det(100, 100))
    fresh = (_det(102, 98), _det(300, 300))
    merged = merge_regions(cached, fresh, [SourceRect(50, 50, 150, 150)])
    assert [(d.x1 + 5, d.y1 + 5) for d in merged] == [(10, 10), (102, 98)]
