"""daemon.inference.nms and yolo: table-driven tests on synthetic arrays for every output layout."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
from numpy.typing import NDArray

from daemon.decode.letterbox import letterbox_params
from daemon.inference.model import Layout
from daemon.inference.nms import batched_nms, nms
from daemon.inference.yolo import decode_output, to_detections
from daemon.types import Detection

NC = 3  # classes in the synthetic outputs
N_ANCHORS = 50


class Obj(NamedTuple):
    cx: float
    cy: float
    w: float
    h: float
    cls: int
    score: float


def _raw(layout: Layout, images: list[list[Obj]], n: int = N_ANCHORS) -> NDArray[np.float32]:
    """A raw model output holding ``images`` (each a list of objects) in the given layout; other rows are
    background (zero scores). anchors_first puts the whole score in the class column (objectness 1)."""
    if layout == "anchors_last":
        raw = np.zeros((len(images), 4 + NC, n), np.float32)
        for b, objs in enumerate(images):
            for i, o in enumerate(objs):
                raw[b, :4, i] = (o.cx, o.cy, o.w, o.h)
                raw[b, 4 + o.cls, i] = o.score
                raw[b, 4 + (o.cls + 1) % NC, i] = o.score / 3  # a weaker second class must not win
        return raw
    if layout == "anchors_first":
        raw = np.zeros((len(images), n, 5 + NC), np.float32)
        for b, objs in enumerate(images):
            for i, o in enumerate(objs):
                raw[b, i, :5] = (o.cx, o.cy, o.w, o.h, 1.0)
                raw[b, i, 5 + o.cls] = o.score
        return raw
    raw = np.zeros((len(images), n, 6), np.float32)
    for b, objs in enumerate(images):
        for i, o in enumerate(objs):
            raw[b, i] = (o.cx - o.w / 2, o.cy - o.h / 2, o.cx + o.w / 2, o.cy + o.h / 2, o.score, o.cls)
    return raw


A = Obj(100, 100, 40, 40, 0, 0.9)
A_NEAR = Obj(102, 101, 40, 40, 0, 0.8)  # IoU with A ~0.88: suppressed when same class
A_NEAR_OTHER = A_NEAR._replace(cls=1)  # same box, other class: kept
B = Obj(300, 200, 60, 30, 2, 0.6)
WEAK = Obj(500, 500, 20, 20, 1, 0.2)
AT_CONF = Obj(400, 100, 20, 20, 1, 0.25)  # exactly at conf: dropped (strictly greater keeps)

ANCHOR_LAYOUTS: list[Layout] = ["anchors_last", "anchors_first"]
ALL_LAYOUTS: list[Layout] = [*ANCHOR_LAYOUTS, "end2end"]


@pytest.mark.parametrize("layout", ANCHOR_LAYOUTS)
@pytest.mark.parametrize(
    ("objs", "kwargs", "expected"),
    [
        ([A, B], {}, [A, B]),
        ([A, A_NEAR, B], {}, [A, B]),  # same class overlap suppressed
        ([A, A_NEAR_OTHER, B], {}, [A, A_NEAR_OTHER, B]),  # class-aware: different class survives
        ([A, A_NEAR, B], {"iou": 0.95}, [A, A_NEAR, B]),  # IoU below threshold: both kept
        ([A, B, WEAK, AT_CONF], {}, [A, B]),  # confidence filter, strict >
        ([A, B, WEAK], {"conf": 0.1}, [A, B, WEAK]),
        ([A, A_NEAR_OTHER, B], {"max_det": 2}, [A, A_NEAR_OTHER]),
        ([A, A_NEAR_OTHER, B], {"classes": [1, 2]}, [A_NEAR_OTHER, B]),
        ([A, B], {"classes": []}, []),
        ([], {}, []),
        ([WEAK], {}, []),
    ],
)
def test_decode_anchor_layouts(layout: Layout, objs: list[Obj], kwargs: dict[str, object], expected: list[Obj]) -> None:
    args: dict[str, object] = {"conf": 0.25, "iou": 0.7, **kwargs}
    out = decode_output(_raw(layout, [objs]), layout, **args)  # type: ignore[arg-type]
    assert len(out) == 1
    _assert_rows(out[0], expected)


@pytest.mark.parametrize(
    ("objs", "kwargs", "expected"),
    [
        ([B, A], {}, [A, B]),  # sorted best first
        ([A, A_NEAR, B], {}, [A, A_NEAR, B]),  # no NMS: the model already did it
        ([A, B, WEAK, AT_CONF], {}, [A, B]),
        ([A, A_NEAR, B], {"max_det": 1}, [A]),
        ([A, A_NEAR_OTHER, B], {"classes": [2]}, [B]),
        ([], {}, []),
    ],
)
def test_decode_end2end(objs: list[Obj], kwargs: dict[str, object], expected: list[Obj]) -> None:
    args: dict[str, object] = {"conf": 0.25, "iou": 0.7, **kwargs}
    out = decode_output(_raw("end2end", [objs], n=300), "end2end", **args)  # type: ignore[arg-type]
    _assert_rows(out[0], expected)


def _assert_rows(rows: NDArray[np.float32], expected: list[Obj]) -> None:
    assert rows.dtype == np.float32
    assert rows.shape == (len(expected), 6)
    want = np.array([[o.cx - o.w / 2, o.cy - o.h / 2, o.cx + o.w / 2, o.cy + o.h / 2, o.score, o.cls]
                     for o in expected], np.float32).reshape(-1, 6)
    np.testing.assert_allclose(rows, want, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_batch_images_are_independent(layout: Layout) -> None:
    out = decode_output(_raw(layout, [[A, B], [], [A_NEAR_OTHER]], n=60), layout, 0.25, 0.7)
    assert [len(o) for o in out] == [2, 0, 1]


def test_anchors_first_multiplies_objectness() -> None:
    raw = np.zeros((1, 10, 5 + NC), np.float32)
    raw[0, 0, :5] = (50, 50, 10, 10, 0.5)
    raw[0, 0, 5 + 1] = 0.8  # 0.5 * 0.8 = 0.4 > 0.25
    raw[0, 1, :5] = (150, 50, 10, 10, 0.9)
    raw[0, 1, 5 + 2] = 0.2  # 0.18 < 0.25
    raw[0, 2, :5] = (250, 50, 10, 10, 0.2)  # objectness alone below conf
    raw[0, 2, 5 + 0] = 1.0
    out = decode_output(raw, "anchors_first", 0.25, 0.7)[0]
    np.testing.assert_allclose(out, [[45, 45, 55, 55, 0.4, 1]], rtol=1e-6)


def test_max_det_keeps_the_best() -> None:
    objs = [Obj(20.0 + 30 * i, 50, 20, 20, i % NC, 0.3 + 0.01 * i) for i in range(20)]
    out = decode_output(_raw("anchors_last", [objs]), "anchors_last", 0.25, 0.7, max_det=5)[0]
    np.testing.assert_allclose(out[:, 4], [0.49, 0.48, 0.47, 0.46, 0.45], rtol=1e-6)


def test_decode_output_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="must be 3-D"):
        decode_output(np.zeros((84, 8400), np.float32), "anchors_last", 0.25, 0.7)
    with pytest.raises(ValueError, match="max_det must be >= 1"):
        decode_output(np.zeros((1, 84, 10), np.float32), "anchors_last", 0.25, 0.7, max_det=0)
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        decode_output(np.zeros((1, 84, 10), np.float32), "nope", 0.25, 0.7)  # type: ignore[arg-type]


# -- nms ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("boxes", "scores", "iou", "keep"),
    [
        ([], [], 0.5, []),
        ([[0, 0, 10, 10]], [0.5], 0.5, [0]),
        ([[0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.9], 0.5, [1]),  # identical: the best one stays
        ([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], 0.5, [0, 1]),  # IoU 1/3
        ([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], 0.3, [0]),
        ([[0, 0, 10, 10], [0, 0, 10, 5]], [0.9, 0.8], 0.5, [0, 1]),  # IoU exactly 0.5: kept (suppress if >)
        ([[0, 0, 10, 10], [20, 20, 30, 30], [1, 1, 11, 11]], [0.7, 0.8, 0.9], 0.5, [2, 1]),
        ([[0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10]], [0.9, 0.8, 0.7], 0.7, [0, 2]),  # chain: 2 not by 1
        ([[0, 0, 0, 0], [0, 0, 0, 0]], [0.9, 0.8], 0.5, [0, 1]),  # degenerate boxes: IoU 0
        ([[0, 0, 10, 10], [0, 0, 10, 10]], [0.8, 0.8], 0.5, [0]),  # tie: lower index first
    ],
)
def test_nms_table(boxes: list[list[float]], scores: list[float], iou: float, keep: list[int]) -> None:
    got = nms(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32), iou)
    assert got.dtype == np.int64
    assert got.tolist() == keep


def test_nms_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        nms(np.zeros((2, 4)), np.zeros(1), 0.5)


def test_batched_nms_separates_classes_even_with_negative_coordinates() -> None:
    boxes = np.array([[-5, -5, 5, 5], [-5, -5, 5, 5], [-4, -5, 5, 5]], np.float32)
    keep = batched_nms(boxes, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]


def test_nms_matches_bruteforce_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 200, (300, 2))
    wh = rng.uniform(5, 60, (300, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.uniform(0, 1, 300)
    keep = nms(boxes, scores, 0.45).tolist()
    # Brute force, written the slow obvious way.
    order = sorted(range(300), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= 0.45 for k in kept):
            kept.append(i)
    assert keep == kept


def _iou(a: NDArray[np.float64], b: NDArray[np.float64]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


# -- to_detections --------------------------------------------------------------------------------------------
def test_to_detections_maps_to_source_pixels() -> None:
    lb = letterbox_params(1280, 720, 640)  # scale 0.5, pad_y 140
    rows = np.array([[10, 150, 110, 250, 0.9, 1], [600, 100, 700, 600, 0.5, 7]], np.float32)
    dets = to_detections(rows, lb, ("person", "car"))
    assert dets[0] == Detection(1, "car", pytest.approx(0.9), 20.0, 20.0, 220.0, 220.0)  # type: ignore[arg-type]
    assert dets[1].class_name == "class7"  # id beyond the names
    assert (dets[1].x1, dets[1].y1, dets[1].x2, dets[1].y2) == (1200.0, 0.0, 1280.0, 720.0)  # clipped
    assert all(isinstance(v, float) for v in (dets[0].score, dets[0].x1))
    assert to_detections(np.zeros((0, 6), np.float32), lb, ("a",)) == ()
