"""Stage 3 on the GPU: YOLO box decoding and class-aware NMS in CuPy; only the final boxes go to the host.

NMS is Cluster-NMS: the IoU matrix of the candidates (upper triangle, score order) is reduced again and again with
the current keep mask until it no longer changes, which gives exactly greedy NMS's result without a sequential
loop on the device. Same rules as daemon.inference.yolo: a box passes when its best class score is > conf.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

MAX_CANDIDATES = 4096  # by score; more than any real frame has above a sane threshold


def _cp() -> Any:
    import cupy

    return cupy


def candidates(pred: Any, layout: str, conf: float) -> tuple[Any, Any, Any]:
    """Boxes (xyxy), best scores and class ids (device arrays) of one image's rows scoring above ``conf``."""
    cp = _cp()
    if layout == "anchors_last":
        scores_all = pred[4:]
        best = scores_all.max(axis=0)
        sel = cp.flatnonzero(best > conf)
        cls = scores_all[:, sel].argmax(axis=0).astype(cp.float32)
        xywh = pred[:4, sel].T
        scores = best[sel]
    elif layout == "anchors_first":
        rows = pred[pred[:, 4] > conf]
        class_scores = rows[:, 5:] * rows[:, 4:5]
        best = class_scores.max(axis=1) if rows.shape[0] else cp.zeros(0, cp.float32)
        keep = best > conf
        cls = class_scores[keep].argmax(axis=1).astype(cp.float32)
        xywh = rows[keep, :4]
        scores = best[keep]
    elif layout == "end2end":
        rows = pred[pred[:, 4] > conf]
        return rows[:, :4], rows[:, 4], rows[:, 5]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    half = xywh[:, 2:4] / 2
    boxes = cp.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)
    return boxes, scores, cls


def cluster_nms(boxes: Any, scores: Any, classes: Any, iou: float) -> Any:
    """Indices (device) of the boxes greedy class-aware NMS keeps, best first."""
    cp = _cp()
    n = int(scores.shape[0])
    if n == 0:
        return cp.zeros(0, cp.int64)
    order = cp.argsort(-scores, kind="stable") if hasattr(cp, "argsort") else cp.argsort(-scores)
    order = order[:MAX_CANDIDATES]
    b = boxes[order].astype(cp.float64)
    span = float(cp.abs(b).max()) * 2.0 + 1.0
    b = b + classes[order].astype(cp.float64)[:, None] * span
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = cp.maximum(x2 - x1, 0) * cp.maximum(y2 - y1, 0)
    w = cp.maximum(cp.minimum(x2[:, None], x2[None, :]) - cp.maximum(x1[:, None], x1[None, :]), 0)
    h = cp.maximum(cp.minimum(y2[:, None], y2[None, :]) - cp.maximum(y1[:, None], y1[None, :]), 0)
    inter = w * h
    union = area[:, None] + area[None, :] - inter
    ious = cp.where(union > 0, inter / cp.where(union > 0, union, 1), 0)
    ious = cp.triu(ious, k=1)  # [i, j]: i scores higher than j
    keep = cp.ones(ious.shape[0], dtype=cp.bool_)
    for _ in range(ious.shape[0]):
        suppressed = (ious * keep[:, None]).max(axis=0) > iou
        new_keep = ~suppressed
        if bool((new_keep == keep).all()):
            break
        keep = new_keep
    return order[cp.flatnonzero(keep)]


def decode_batch(raw: Any, layout: str, conf: float, iou: float, max_det: int,
                 classes: frozenset[int] | None = None) -> list[NDArray[np.float32]]:
    """Per image an (N, 6) host array x1, y1, x2, y2, score, class in model pixels: only these leave the GPU."""
    cp = _cp()
    out: list[NDArray[np.float32]] = []
    wanted = None if classes is None else cp.asarray(sorted(classes), dtype=cp.float32)
    for i in range(raw.shape[0]):
        boxes, scores, cls = candidates(raw[i].astype(cp.float32, copy=False), layout, conf)
        if wanted is not None and scores.shape[0]:
            sel = cp.isin(cls, wanted)
            boxes, scores, cls = boxes[sel], scores[sel], cls[sel]
        if layout == "end2end":
            keep = cp.argsort(-scores)[:max_det]
        else:
            keep = cluster_nms(boxes, scores, cls, iou)[:max_det]
        det = cp.concatenate([boxes[keep], scores[keep, None], cls[keep, None]], axis=1).astype(cp.float32)
        out.append(cp.asnumpy(det))
    return out


TOP_K = 1024  # candidates per image that enter NMS (by score)
SPAN = 8192.0  # class offset for class-aware NMS: larger than any box coordinate


def decode_rows(raw: Any, layout: str, conf: NDArray[np.float32], iou: NDArray[np.float32],
                max_det: int = 300) -> list[NDArray[np.float32]]:
    """All rows of a batch at once (anchors_last layout): per-row thresholds, batched Cluster-NMS, and a single
    device-to-host copy of only the kept boxes. Other layouts fall back to ``decode_batch`` row by row."""
    cp = _cp()
    b = int(raw.shape[0])
    if layout != "anchors_last":
        return [decode_batch(raw[i : i + 1], layout, float(conf[i]), float(iou[i]), max_det)[0] for i in range(b)]
    pred = raw.astype(cp.float32, copy=False)
    scores_all = pred[:, 4:, :]
    best = scores_all.max(axis=1)  # (B, N)
    cls = scores_all.argmax(axis=1).astype(cp.float32)
    conf_d = cp.asarray(conf, dtype=cp.float32)[:, None]
    masked = cp.where(best > conf_d, best, -1.0)
    k = min(TOP_K, int(masked.shape[1]))
    order = cp.argsort(-masked, axis=1)[:, :k]  # (B, K)
    sc = cp.take_along_axis(masked, order, axis=1)
    cl = cp.take_along_axis(cls, order, axis=1)
    xywh = cp.stack([cp.take_along_axis(pred[:, j, :], order, axis=1) for j in range(4)], axis=2)  # (B, K, 4)
    half = xywh[..., 2:4] / 2
    boxes = cp.concatenate([xywh[..., :2] - half, xywh[..., :2] + half], axis=2)
    valid = sc > conf_d
    ob = boxes.astype(cp.float64) + cl.astype(cp.float64)[..., None] * SPAN
    x1, y1, x2, y2 = ob[..., 0], ob[..., 1], ob[..., 2], ob[..., 3]
    area = cp.maximum(x2 - x1, 0) * cp.maximum(y2 - y1, 0)
    w = cp.maximum(cp.minimum(x2[:, :, None], x2[:, None, :]) - cp.maximum(x1[:, :, None], x1[:, None, :]), 0)
    h = cp.maximum(cp.minimum(y2[:, :, None], y2[:, None, :]) - cp.maximum(y1[:, :, None], y1[:, None, :]), 0)
    inter = w * h
    union = area[:, :, None] + area[:, None, :] - inter
    ious = cp.where(union > 0, inter / cp.where(union > 0, union, 1), 0).astype(cp.float32)
    ious = cp.triu(ious, k=1)  # [b, i, j]: i ranks above j
    thr = cp.asarray(iou, dtype=cp.float32)[:, None]
    keep = valid
    for _ in range(k):
        suppressed = (ious * keep[:, :, None]).max(axis=1) > thr
        new_keep = valid & ~suppressed
        if not bool((new_keep != keep).any()):
            break
        keep = new_keep
    rank = cp.cumsum(keep, axis=1)
    keep &= rank <= max_det
    idx = cp.flatnonzero(keep.ravel())
    rows = idx // k
    det = cp.concatenate([boxes.reshape(-1, 4)[idx], sc.ravel()[idx, None], cl.ravel()[idx, None],
                          rows[:, None].astype(cp.float32)], axis=1)
    host = cp.asnumpy(det)  # the only device-to-host copy: kept boxes
    return [host[host[:, 6] == i, :6].copy() for i in range(b)]
