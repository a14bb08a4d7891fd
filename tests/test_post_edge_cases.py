"""The post stage's batch-wide box mapping (daemon.pipeline.post) on the inputs the vtest equality recordings never
hold: rows that found nothing at the start, middle or end of a batch, crops that found nothing, class filters
that remove every box, and decoded rows with non-finite values (a corrupt engine output)."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.delta.policy import Decision, DeltaParams, Rect, Verdict
from daemon.delta.tracker import DeltaTracker
from daemon.pipeline.post import BatchDetections
from daemon.pipeline.prepare import Placement, Prepared
from daemon.pipeline.settings import CameraSettings
from daemon.types import Frame, Letterbox

LB = Letterbox(src_w=768, src_h=576, scale=640 / 768, pad_x=0.0, pad_y=80.0)
NAN, INF = float("nan"), float("inf")
GOOD = (64, 144, 128, 224, 0.9, 0)


def _settings(camera: str = "a", classes: frozenset[int] | None = None, max_det: int = 100) -> CameraSettings:
    return CameraSettings(camera, 0.25, 0.7, max_det, classes, None, ())


def _item(verdict: Verdict, slot: int = -1, placements: tuple[Placement, ...] = (), camera: str = "a") -> Prepared:
    return Prepared(Frame(camera, 1, 0.0, 0.0, jpeg=b"-"), verdict, slot, placements, LB, (0, 0), 768, 576, 0, 0.0,
                    1.0, None)


def _rows(*boxes: tuple[float, ...]) -> np.ndarray:
    return np.asarray(boxes, np.float32).reshape(-1, 6)


def _full(slot: int, camera: str = "a") -> Prepared:
    return _item(Verdict(Decision.FULL, "keyframe"), slot=slot, camera=camera)


@pytest.mark.parametrize("empty_at", [0, 1, 2])
def test_a_row_that_found_nothing_anywhere_in_the_batch_leaves_the_others_theirs(empty_at: int) -> None:
    rows = [_rows(GOOD, (300, 300, 400, 400, 0.5, 0)) for _ in range(3)]
    rows[empty_at] = _rows()
    post = BatchDetections([_full(0), _full(1), _full(2)], rows, lambda c: _settings(), ["person"], None)
    assert [len(post(k)[0]) for k in range(3)] == [0 if k == empty_at else 2 for k in range(3)]


def test_a_class_filter_that_removes_every_box_of_one_camera_leaves_the_next_one_its_boxes() -> None:
    filters = {"a": _settings("a", frozenset({5})), "b": _settings("b"), "c": _settings("c", frozenset())}
    items = [_full(0, "a"), _full(1, "b"), _full(2, "c")]
    rows = [_rows(GOOD), _rows(GOOD, GOOD), _rows(GOOD)]
    post = BatchDetections(items, rows, filters.get, ["person"], None)
    assert [len(post(k)[0]) for k in range(3)] == [0, 2, 0]


@pytest.mark.parametrize("bad", [
    (NAN, 144, 128, 224, 0.9, 0), (64, 144, INF, 224, 0.9, 0), (64, 144, 128, 224, INF, 0),
    (64, 144, 128, 224, 0.9, NAN), (64, -INF, 128, 224, 0.9, 0),
])
def test_a_decoded_box_with_a_non_finite_value_is_dropped_and_counted(bad: tuple[float, ...]) -> None:
    """A corrupt engine output (NaN/inf in a row) must not reach the published boxes, nor the tracker's cache,
    where a NaN corner stopped the pre stage at the camera's next frame (math.floor of NaN in plan)."""
    region = Rect(320, 160, 416, 320)
    crop = _item(Verdict(Decision.REGIONS, "test", (region,)), placements=(Placement(1, 0, 0, region),))
    rows = [_rows(bad, GOOD), _rows((10, 20, 50, 100, 0.8, 0), bad)]
    post = BatchDetections([_full(0), crop], rows, lambda c: _settings(), ["person"], None)
    assert post.dropped == 2
    full, _ = post(0)
    assert [d.score for d in full] == pytest.approx([0.9])
    assert len(post(1)[0]) == 1
    assert all(np.isfinite([d.score, d.x1, d.y1, d.x2, d.y2]).all() for d in full)


def test_a_corrupt_row_under_delta_caching_leaves_the_next_plan_working() -> None:
    tracker = DeltaTracker()
    tracker.configure("a", DeltaParams())
    sig = np.full((80, 80), 100, np.uint8)
    v = tracker.plan("a", sig, LB, 0.0)
    item = _item(v, slot=0)
    post = BatchDetections([item], [_rows((NAN, 144, 128, 224, 0.9, 0), GOOD)], lambda c: _settings(), ["person"],
                           tracker, lambda: 0.0)
    dets, _ = post(0)
    assert len(dets) == 1
    assert tracker.plan("a", sig, LB, 0.1).decision is Decision.SKIP  # raised ValueError (NaN to integer)


def test_no_boxes_dropped_in_a_clean_batch() -> None:
    post = BatchDetections([_full(0)], [_rows(GOOD)], lambda c: _settings(), ["person"], None)
    assert post.dropped == 0
