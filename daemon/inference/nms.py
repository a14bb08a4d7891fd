"""Greedy non-maximum suppression in pure numpy (same rule as torchvision.ops.nms)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def nms(boxes: NDArray[np.floating], scores: NDArray[np.floating], iou: float) -> NDArray[np.int64]:
    """Indices of the boxes to keep, by descending score.

    ``boxes`` (N, 4) xyxy, ``scores`` (N,). A box is suppressed when its IoU with a higher-scoring kept box is
    greater than ``iou``. Ties in score keep the lower index first.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if b.shape[0] != s.shape[0]:
        raise ValueError(f"nms: {b.shape[0]} boxes but {s.shape[0]} scores")
    if b.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    with np.errstate(invalid="ignore"):  # inf - inf of a corrupt box: NaN area, never overlapping (counted upstream)
        areas = np.maximum(x2 - x1, 0.0) * np.maximum(y2 - y1, 0.0)
    order = np.argsort(-s, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0.0)
        h = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0.0)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: NDArray[np.floating], scores: NDArray[np.floating], classes: NDArray[np.floating], iou: float
) -> NDArray[np.int64]:
    """Class-aware NMS: boxes of different classes never suppress each other (offset trick: each class is
    shifted by its id times a span larger than every coordinate)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if b.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    finite = np.abs(b[np.isfinite(b)])  # a NaN/inf corner (corrupt output) must not poison every class's offset:
    span = float(finite.max()) * 2.0 + 1.0 if finite.size else 1.0  # such a box neither suppresses nor is suppressed
    offset = np.asarray(classes, dtype=np.float64).reshape(-1, 1) * span
    return nms(b + offset, scores, iou)
