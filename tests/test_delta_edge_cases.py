"""Delta planning on degenerate inputs the vtest recordings never hold: cached boxes that cover no model-input
pixel of the frame's content (a box clipped to zero width at the image border, a box left outside the content by
a letterbox change), and imported states with non-finite boxes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from daemon.decode.letterbox import letterbox_params
from daemon.delta.policy import Decision, DeltaParams
from daemon.delta.tracker import DeltaTracker
from daemon.features.state import StateError, from_bytes, to_bytes
from daemon.pipeline.post import BatchDetections
from daemon.pipeline.prepare import CpuPreparer
from daemon.pipeline.settings import CameraSettings
from daemon.types import Detection, Frame

SETTINGS = CameraSettings("a", 0.25, 0.7, 100, None, None, ())


def _frame(seq: int, image: np.ndarray) -> Frame:
    return Frame("a", seq, 0.0, 0.0, pixels=image)


def test_a_due_recheck_of_a_box_clipped_to_zero_width_does_not_stop_the_pre_stage() -> None:
    """context_px 0 and re-checks on: a model box left of a square image is clipped to x1 = x2 = 0, and its
    re-check became a 0-pixel-wide region, which the canvas packer refused (ValueError in prepare)."""
    tracker = DeltaTracker()
    tracker.configure("a", DeltaParams(context_px=0, recheck_frames=1))
    clock = iter(float(t) for t in range(10))
    prep = CpuPreparer(640, 4096 * 4096, 1 << 24, delta=tracker, clock=lambda: next(clock))
    image = np.random.default_rng(1).integers(0, 255, (640, 640, 3), dtype=np.uint8)
    buffer = np.zeros((2, 3, 640, 640), np.float32)
    batch = prep.prepare([_frame(1, image)], buffer, lambda c: SETTINGS)
    assert batch.items[0].verdict.decision is Decision.FULL
    rows = [np.asarray([(-30, 100, -10, 200, 0.9, 0), (100, 100, 200, 300, 0.8, 0)], np.float32)]
    dets, _ = BatchDetections(batch.items, rows, lambda c: SETTINGS, ["person"], tracker, lambda: 0.0)(0)
    assert (dets[0].x1, dets[0].x2) == (0.0, 0.0)
    batch = prep.prepare([_frame(2, image)], buffer, lambda c: SETTINGS)  # raised ValueError (region 0x128)
    item = batch.items[0]
    assert item.verdict.decision is not Decision.FULL
    assert all(r.x2 > r.x1 and r.y2 > r.y1 for r in item.verdict.regions)
    assert all(p.region.area > 0 for p in item.placements)


def test_a_due_recheck_of_a_box_outside_a_changed_letterbox_makes_no_empty_region() -> None:
    """The camera's frames went from 768x576 to 768x432: a cached box near the old bottom edge lies below the new
    content, and its re-check region (grown, clipped to the content) was empty (Rect(224, 512, 320, 512))."""
    old, new = letterbox_params(768, 576, 640), letterbox_params(768, 432, 640)
    tracker = DeltaTracker()
    tracker.configure("a", DeltaParams(recheck_frames=1))
    sig = np.full((80, 80), 100, np.uint8)
    v = tracker.plan("a", sig, old, 0.0)
    tracker.resolve("a", v, [Detection(0, "person", 0.9, 300.0, 500.0, 340.0, 570.0)], old, 0.0)
    v = tracker.plan("a", sig, new, 0.1)
    assert all(r.x2 > r.x1 and r.y2 > r.y1 for r in v.regions), v


@pytest.mark.parametrize("bad", [{"x1": float("nan")}, {"y2": float("inf")}, {"score": float("nan")}])
def test_an_imported_state_with_a_non_finite_box_is_refused(bad: dict[str, float]) -> None:
    """A state is JSON (NaN and Infinity pass json.loads); a NaN corner installed in the cache stopped the next
    plan() (math.floor of NaN). import_state refuses unsound states with StateError, changing nothing."""
    lb = letterbox_params(768, 576, 640)
    home = DeltaTracker()
    home.configure("a", DeltaParams())
    sig = np.full((80, 80), 100, np.uint8)
    v = home.plan("a", sig, lb, 0.0)
    home.resolve("a", v, [Detection(0, "person", 0.9, 300.0, 200.0, 340.0, 300.0)], lb, 0.0)
    state = home.export_state("a", 0.0)
    state = from_bytes(to_bytes(replace(state, detections=(replace(state.detections[0], **bad),))), 0.0)
    guest = DeltaTracker()
    guest.configure("a", DeltaParams())
    with pytest.raises(StateError, match="not finite"):
        guest.import_state("a", state, 0.0)
    assert guest.plan("a", sig, lb, 0.1).decision is Decision.FULL  # nothing installed: no reference yet


def test_regions_on_a_grid_that_does_not_divide_the_model_input_stay_inside_it() -> None:
    """delta.align 64 with a 480-pixel model (480 = 7.5 x 64): a change at the frame's right edge snapped its
    region out to x = 512, past the input; the crop copy then failed (ValueError: could not broadcast (3,128,96)
    into (3,128,128)) and stopped the pre stage."""
    tracker = DeltaTracker()
    tracker.configure("a", DeltaParams(align=64))
    clock = iter(float(t) / 10 for t in range(10))
    prep = CpuPreparer(480, 4096 * 4096, 1 << 24, delta=tracker, clock=lambda: next(clock))
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    buffer = np.zeros((2, 3, 480, 480), np.float32)
    assert prep.prepare([_frame(1, image)], buffer, lambda c: SETTINGS).items[0].verdict.decision is Decision.FULL
    image = image.copy()
    image[200:260, 600:640] = 255 - image[200:260, 600:640]  # a change at the right edge
    item = prep.prepare([_frame(2, image)], buffer, lambda c: SETTINGS).items[0]
    assert item.verdict.decision is Decision.REGIONS
    assert all(0 <= r.x1 < r.x2 <= 480 and 0 <= r.y1 < r.y2 <= 480 for r in item.verdict.regions)
    assert max(r.x2 for r in item.verdict.regions) == 480  # the change at the edge is still inside a region


def test_tile_scores_of_the_old_tile_size_are_not_read_with_the_new_one() -> None:
    """The GPU path scores a frame's tiles with the camera's cells_per_tile read before plan_round takes the lock;
    a reload that changed delta.tile in between handed 40x40 scores of 16-pixel tiles to a plan that read them as
    32-pixel tiles: the changed region came out at twice its coordinates, and the change itself was not inferred."""
    from daemon.delta.changemap import tile_scores

    lb = letterbox_params(640, 640, 640)
    tracker = DeltaTracker()
    tracker.configure("a", DeltaParams(tile=16))
    sig = np.full((80, 80), 100, np.uint8)
    assert tracker.plan("a", sig, lb, 0.0).decision is Decision.FULL
    moved = sig.copy()
    moved[20:24, 20:24] = 200  # model-input pixels 160-192 on both axes
    stale = tile_scores(moved, sig, tracker.cells_per_tile("a"))
    tracker.configure("a", DeltaParams(tile=32))
    v = tracker.plan("a", moved, lb, 0.1, scores=stale)
    assert v.decision is Decision.REGIONS
    assert any(r.x1 <= 160 and 192 <= r.x2 and r.y1 <= 160 and 192 <= r.y2 for r in v.regions), v
