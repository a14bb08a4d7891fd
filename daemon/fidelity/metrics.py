"""COCO-style detection metrics of candidate boxes against reference boxes taken as ground truth, in numpy.

Same rules as pycocotools' COCOeval for boxes (area "all", no crowd, ``max_dets`` per image and class): IoU
thresholds 0.50:0.05:0.95; per image and class, detections in descending score order each take the unmatched
reference box of highest IoU at or above the threshold; per class, precision is made monotone and read at 101
recall points (0, 0.01, ..., 1), AP is their mean. Classes without reference objects get no AP.

Three summaries, because a plain class mean is dominated by rare classes near the confidence threshold:
object-weighted (each class weighted by its reference object count), per class (for classes with at least
``min_objects`` reference objects), and the plain class mean (for the record).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MIN_OBJECTS = 50


@dataclass(frozen=True, slots=True)
class ClassAP:
    """One class: AP at IoU .5 and averaged over .50:.95, and recall at IoU .5 (share of reference objects
    matched by some candidate box)."""

    class_id: int
    name: str
    ref_objects: int
    candidate_boxes: int
    ap50: float
    ap50_95: float
    recall50: float


@dataclass(frozen=True, slots=True)
class DetectionMetrics:
    images: int
    ref_objects: int
    candidate_boxes: int
    classes: tuple[ClassAP, ...]  # classes with reference objects, most objects first
    unmatched_classes: dict[str, int]  # candidate boxes of classes absent from the reference
    min_objects: int
    map50_weighted: float
    map50_95_weighted: float
    recall50_weighted: float
    map50_mean: float
    map50_95_mean: float

    def major(self) -> tuple[ClassAP, ...]:
        """Classes with at least ``min_objects`` reference objects."""
        return tuple(c for c in self.classes if c.ref_objects >= self.min_objects)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["major_classes"] = [c.name for c in self.major()]
        return d


def box_iou(a: NDArray[np.floating], b: NDArray[np.floating]) -> NDArray[np.float64]:
    """(len(a), len(b)) IoU of xyxy boxes (pycocotools' arithmetic: areas w*h, no +1)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: NDArray[np.float64] = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return out


def match_image(
    det_boxes: NDArray[np.floating], gt_boxes: NDArray[np.floating], thresholds: NDArray[np.floating] = IOU_THRESHOLDS
) -> NDArray[np.bool_]:
    """(T, D) true-positive flags of detections (already in descending score order) at each IoU threshold."""
    d, g = len(det_boxes), len(gt_boxes)
    tp = np.zeros((len(thresholds), d), dtype=bool)
    if d == 0 or g == 0:
        return tp
    ious = box_iou(det_boxes, gt_boxes)
    for ti, t in enumerate(thresholds):
        taken = np.zeros(g, dtype=bool)
        floor = min(float(t), 1 - 1e-10)
        for di in range(d):
            cand = np.where(taken, -1.0, ious[di])
            best = int(np.argmax(cand))
            if cand[best] >= floor:  # ties go to the lowest index, as in COCOeval's >= scan
                taken[best] = True
                tp[ti, di] = True
    return tp


def average_precision(tp: NDArray[np.bool_], scores: NDArray[np.floating], n_gt: int) -> tuple[NDArray[np.float64],
                                                                                              NDArray[np.float64]]:
    """(AP per threshold, final recall per threshold) from (T, D) flags of all images of one class."""
    t = tp.shape[0]
    if n_gt == 0:
        return np.full(t, np.nan), np.full(t, np.nan)
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    flags = tp[:, order]
    tps = np.cumsum(flags, axis=1, dtype=np.float64)
    fps = np.cumsum(~flags, axis=1, dtype=np.float64)
    ap = np.zeros(t)
    recall = np.zeros(t)
    for ti in range(t):
        if flags.shape[1] == 0:
            continue
        rc = tps[ti] / n_gt
        pr = tps[ti] / (tps[ti] + fps[ti] + np.spacing(1))
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # monotone non-increasing
        idx = np.searchsorted(rc, RECALL_POINTS, side="left")
        ap[ti] = float(np.where(idx < len(pr), pr[np.minimum(idx, len(pr) - 1)], 0.0).mean())
        recall[ti] = rc[-1]
    return ap, recall


def evaluate(
    reference: Sequence[NDArray[np.floating]],
    candidate: Sequence[NDArray[np.floating]],
    class_names: Sequence[str],
    max_dets: int = 300,
    min_objects: int = MIN_OBJECTS,
) -> DetectionMetrics:
    """Metrics of ``candidate`` against ``reference`` (one (N, 6) array per image: x1, y1, x2, y2, score,
    class id; reference scores are ignored)."""
    if len(reference) != len(candidate):
        raise ValueError(f"evaluate: {len(reference)} reference images but {len(candidate)} candidate images")
    ref = [np.asarray(r, np.float64).reshape(-1, 6) for r in reference]
    cand = [np.asarray(c, np.float64).reshape(-1, 6) for c in candidate]
    ref_ids = {int(c) for r in ref for c in r[:, 5]}
    cand_ids = {int(c) for x in cand for c in x[:, 5]}
    per_class = [_class_ap(ref, cand, k, class_names, max_dets) for k in sorted(ref_ids)]
    per_class.sort(key=lambda c: (-c.ref_objects, c.class_id))
    counts = np.array([c.ref_objects for c in per_class], dtype=np.float64)
    total = float(counts.sum())

    def weighted(values: list[float]) -> float:
        return float(np.dot(counts, values) / total) if total else float("nan")

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    return DetectionMetrics(
        images=len(ref), ref_objects=int(total), candidate_boxes=int(sum(len(c) for c in cand)),
        classes=tuple(per_class),
        unmatched_classes={_name(k, class_names): int(sum(int(np.sum(x[:, 5] == k)) for x in cand))
                           for k in sorted(cand_ids - ref_ids)},
        min_objects=min_objects,
        map50_weighted=weighted([c.ap50 for c in per_class]),
        map50_95_weighted=weighted([c.ap50_95 for c in per_class]),
        recall50_weighted=weighted([c.recall50 for c in per_class]),
        map50_mean=mean([c.ap50 for c in per_class]), map50_95_mean=mean([c.ap50_95 for c in per_class]),
    )


def _name(k: int, names: Sequence[str]) -> str:
    return names[k] if 0 <= k < len(names) else f"class{k}"


def _class_ap(ref: list[NDArray[np.float64]], cand: list[NDArray[np.float64]], k: int, names: Sequence[str],
              max_dets: int) -> ClassAP:
    flags: list[NDArray[np.bool_]] = []
    scores: list[NDArray[np.float64]] = []
    n_gt = n_det = 0
    for r, c in zip(ref, cand, strict=True):
        gt = r[r[:, 5] == k, :4]
        dt = c[c[:, 5] == k]
        dt = dt[np.argsort(-dt[:, 4], kind="mergesort")][:max_dets]
        n_gt += len(gt)
        n_det += len(dt)
        flags.append(match_image(dt[:, :4], gt))
        scores.append(dt[:, 4])
    tp = np.concatenate(flags, axis=1) if flags else np.zeros((len(IOU_THRESHOLDS), 0), dtype=bool)
    ap, recall = average_precision(tp, np.concatenate(scores) if scores else np.zeros(0), n_gt)
    return ClassAP(class_id=k, name=_name(k, names), ref_objects=n_gt, candidate_boxes=n_det, ap50=float(ap[0]),
                   ap50_95=float(ap.mean()), recall50=float(recall[0]))
