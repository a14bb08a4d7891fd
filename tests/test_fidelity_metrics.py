"""COCO-style metrics of candidate boxes vs reference boxes: table-driven cases, and one cross-check against
pycocotools' COCOeval on random boxes."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import pytest

from daemon.fidelity.metrics import IOU_THRESHOLDS, box_iou, evaluate, match_image

NAMES = ("person", "car", "dog")


def rows(*boxes: tuple[float, float, float, float, float, int]) -> np.ndarray:
    return np.array(boxes, dtype=np.float32).reshape(-1, 6)


def test_box_iou_known_values() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], np.float32)
    assert box_iou(a, b).round(6).tolist() == [[1.0, round(50 / 150, 6), 0.0, 0.0]]


def test_identical_detections_score_one() -> None:
    ref = [rows((0, 0, 10, 10, 0.9, 0), (20, 20, 40, 40, 0.8, 1)), rows((5, 5, 50, 50, 0.7, 0))]
    m = evaluate(ref, ref, NAMES)
    assert (m.map50_weighted, m.map50_95_weighted, m.map50_mean, m.recall50_weighted) == (1.0, 1.0, 1.0, 1.0)
    assert [(c.name, c.ref_objects) for c in m.classes] == [("person", 2), ("car", 1)]


@pytest.mark.parametrize(
    ("candidate", "ap50", "ap50_95", "recall"),
    [
        # nothing detected
        (rows(), 0.0, 0.0, 0.0),
        # box shifted so that IoU = 80/120 = 0.667: a hit at .50/.55/.60/.65 only
        (rows((2, 0, 12, 10, 0.9, 0)), 1.0, 0.4, 1.0),
        # right place, wrong class: a miss for person (and a box of a class the reference never saw)
        (rows((0, 0, 10, 10, 0.9, 2)), 0.0, 0.0, 0.0),
        # a higher-scored false positive first, then the hit: precision 1/2 at full recall
        (rows((50, 50, 60, 60, 0.95, 0), (0, 0, 10, 10, 0.9, 0)), 0.5, 0.5, 1.0),
        # the hit first, then a lower-scored false positive: precision stays 1 up to full recall
        (rows((0, 0, 10, 10, 0.95, 0), (50, 50, 60, 60, 0.9, 0)), 1.0, 1.0, 1.0),
        # a duplicate of the hit: the second one is a false positive after full recall
        (rows((0, 0, 10, 10, 0.95, 0), (0, 0, 10, 10, 0.9, 0)), 1.0, 1.0, 1.0),
    ],
)
def test_single_object_cases(candidate: np.ndarray, ap50: float, ap50_95: float, recall: float) -> None:
    m = evaluate([rows((0, 0, 10, 10, 0.9, 0))], [candidate], NAMES)
    (person,) = m.classes
    assert (round(person.ap50, 6), round(person.ap50_95, 6), person.recall50) == (ap50, ap50_95, recall)


def test_half_recall_gives_about_half_ap() -> None:
    ref = [rows((0, 0, 10, 10, 0.9, 0), (20, 0, 30, 10, 0.9, 0))]
    m = evaluate(ref, [rows((0, 0, 10, 10, 0.9, 0))], NAMES)
    # precision 1 at recall points 0..0.5 (51 of 101), 0 beyond
    assert m.classes[0].ap50 == pytest.approx(51 / 101)
    assert m.classes[0].recall50 == 0.5


def test_weighted_vs_plain_class_mean_and_major_classes() -> None:
    # 60 people all found, 2 cars both missed
    ref = [rows(*[(i * 20, 0, i * 20 + 10, 10, 0.9, 0) for i in range(60)], (0, 50, 10, 60, 0.3, 1),
                (20, 50, 30, 60, 0.3, 1))]
    cand = [rows(*[(i * 20, 0, i * 20 + 10, 10, 0.9, 0) for i in range(60)])]
    m = evaluate(ref, cand, NAMES, min_objects=50)
    assert m.map50_weighted == pytest.approx(60 / 62)
    assert m.map50_mean == pytest.approx(0.5)
    assert [c.name for c in m.major()] == ["person"]
    assert m.unmatched_classes == {}


def test_match_prefers_highest_iou_unmatched() -> None:
    gts = np.array([[0, 0, 10, 10], [1, 0, 11, 10]], np.float32)
    dets = np.array([[1, 0, 11, 10], [0, 0, 10, 10]], np.float32)
    tp = match_image(dets, gts)
    assert tp.shape == (len(IOU_THRESHOLDS), 2)
    assert tp.all()  # each detection takes its exact twin, not the first overlapping box


def _random_images(rng: np.random.Generator, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    refs, cands = [], []
    for _ in range(n):
        k = int(rng.integers(0, 8))
        xy = rng.uniform(0, 500, (k, 2))
        wh = rng.uniform(8, 120, (k, 2))
        cls = rng.integers(0, 3, k)
        ref = np.column_stack([xy, xy + wh, rng.uniform(0.25, 1, k), cls])
        keep = rng.uniform(size=k) > 0.15  # some misses
        jitter = rng.normal(0, 6, (k, 4))
        moved = ref[:, :4] + jitter
        moved[:, 2:] = np.maximum(moved[:, 2:], moved[:, :2] + 1)  # keep boxes valid (COCO ignores negative areas)
        cand = np.column_stack([moved, rng.uniform(0.25, 1, k), cls])[keep]
        m = int(rng.integers(0, 3))  # some false positives
        fxy = rng.uniform(0, 500, (m, 2))
        fp = np.column_stack([fxy, fxy + rng.uniform(8, 120, (m, 2)), rng.uniform(0.25, 1, m), rng.integers(0, 3, m)])
        refs.append(ref.astype(np.float32))
        cands.append(np.vstack([cand, fp]).astype(np.float32))
    return refs, cands


def _coco_eval(refs: list[np.ndarray], cands: list[np.ndarray]) -> tuple[float, float]:
    from pycocotools.coco import COCO  # type: ignore[import-untyped]
    from pycocotools.cocoeval import COCOeval  # type: ignore[import-untyped]

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for i, (r, c) in enumerate(zip(refs, cands, strict=True)):
        images.append({"id": i, "width": 640, "height": 640})
        for j, b in enumerate(r):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(b[5]), "iscrowd": 0,
                         "area": w * h, "bbox": [float(b[0]), float(b[1]), w, h], "_j": j})
        dets.extend({"image_id": i, "category_id": int(b[5]), "score": float(b[4]),
                     "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]} for b in c)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k, "name": n} for k, n in enumerate(NAMES)]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.maxDets = [1, 10, 100]  # summarize() reads AP at maxDets=100
        ev.params.areaRng = [[0, 1e10]] * 4
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


def test_matches_pycocotools_on_random_boxes() -> None:
    pytest.importorskip("pycocotools")
    refs, cands = _random_images(np.random.default_rng(7), 60)
    coco50, coco50_95 = _coco_eval(refs, cands)
    m = evaluate(refs, cands, NAMES, max_dets=100)
    assert m.map50_mean == pytest.approx(coco50, abs=1e-9)
    assert m.map50_95_mean == pytest.approx(coco50_95, abs=1e-9)
    assert 0.1 < m.map50_95_mean < m.map50_mean < 0.9  # a non-trivial case
