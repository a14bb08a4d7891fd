"""Raw YOLO outputs -> boxes: vectorized numpy decoding of the three Ultralytics output layouts, confidence
filter, class-aware NMS, and the mapping back to source pixels.

Same rules as Ultralytics' ``non_max_suppression`` (single label per box): a box survives the confidence filter
when its best class score is strictly greater than ``conf``; at most 30,000 boxes enter NMS; at most ``max_det``
leave it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray

from daemon.decode.letterbox import boxes_to_source
from daemon.inference.model import Layout
from daemon.inference.nms import batched_nms
from daemon.types import Detection, Letterbox

MAX_NMS = 30_000

_Candidates = tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]  # boxes xyxy, scores, cls


def decode_output(
    raw: NDArray[np.float32],
    layout: Layout,
    conf: float,
    iou: float,
    max_det: int = 300,
    classes: Iterable[int] | None = None,
) -> list[NDArray[np.float32]]:
    """One (N, 6) float32 array per image: x1, y1, x2, y2, score, class id, in model-input pixels, best first.

    ``raw`` is the model output: (B, 4+C, N) for ``anchors_last``, (B, N, 5+C) for ``anchors_first``,
    (B, N, 6) for ``end2end``. ``classes`` keeps only those class ids.
    """
    arr = np.asarray(raw, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"decode_output: raw output must be 3-D (B, ...), got shape {arr.shape}")
    if max_det < 1:
        raise ValueError(f"decode_output: max_det must be >= 1, got {max_det}")
    wanted = None if classes is None else np.asarray(sorted(set(classes)), dtype=np.float32)
    return [_decode_one(arr[i], layout, conf, iou, max_det, wanted) for i in range(arr.shape[0])]


def _decode_one(
    pred: NDArray[np.float32], layout: Layout, conf: float, iou: float, max_det: int,
    wanted: NDArray[np.float32] | None,
) -> NDArray[np.float32]:
    boxes, scores, cls = _candidates(pred, layout, conf)
    if wanted is not None:
        sel = np.isin(cls, wanted)
        boxes, scores, cls = boxes[sel], scores[sel], cls[sel]
    if scores.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    if layout == "end2end":  # the model ran NMS itself
        keep = np.argsort(-scores, kind="stable")[:max_det]
    else:
        if scores.size > MAX_NMS:
            top = np.argsort(-scores, kind="stable")[:MAX_NMS]
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        keep = batched_nms(boxes, scores, cls, iou)[:max_det]
    out = np.empty((keep.size, 6), dtype=np.float32)
    out[:, :4] = boxes[keep]
    out[:, 4] = scores[keep]
    out[:, 5] = cls[keep]
    return out


def _candidates(pred: NDArray[np.float32], layout: Layout, conf: float) -> _Candidates:
    """Boxes (xyxy), best-class scores and class ids of the rows whose best score is > ``conf``."""
    if layout == "anchors_last":  # (4+C, N): rows cx, cy, w, h, class scores
        class_scores = pred[4:]
        best = class_scores.max(axis=0)
        sel = np.flatnonzero(best > conf)
        cls = class_scores[:, sel].argmax(axis=0).astype(np.float32)
        return _xywh2xyxy(pred[:4, sel].T), best[sel], cls
    if layout == "anchors_first":  # (N, 5+C): cx, cy, w, h, objectness, class scores
        rows = pred[pred[:, 4] > conf]
        class_scores = rows[:, 5:] * rows[:, 4:5]
        best = class_scores.max(axis=1) if rows.shape[0] else np.zeros(0, np.float32)
        ok = best > conf
        cls = class_scores[ok].argmax(axis=1).astype(np.float32)
        return _xywh2xyxy(rows[ok, :4]), best[ok], cls
    if layout == "end2end":  # (N, 6): x1, y1, x2, y2, score, class
        rows = pred[pred[:, 4] > conf]
        return rows[:, :4].copy(), rows[:, 4].copy(), rows[:, 5].copy()
    raise ValueError(f"decode_output: unknown layout {layout!r}")


def _xywh2xyxy(xywh: NDArray[np.float32]) -> NDArray[np.float32]:
    out = np.empty_like(xywh, dtype=np.float32)
    half = xywh[:, 2:4] / 2
    out[:, :2] = xywh[:, :2] - half
    out[:, 2:] = xywh[:, :2] + half
    return out


def to_detections(arr: NDArray[np.float32], lb: Letterbox, names: Sequence[str]) -> tuple[Detection, ...]:
    """(N, 6) model-input rows from :func:`decode_output` -> detections in source pixels (clipped)."""
    if arr.size == 0:
        return ()
    boxes = boxes_to_source(arr[:, :4], lb).tolist()
    scores = arr[:, 4].tolist()
    ids = arr[:, 5].astype(np.int64).tolist()
    return tuple(
        Detection(class_id=c, class_name=names[c] if 0 <= c < len(names) else f"class{c}", score=s,
                  x1=b[0], y1=b[1], x2=b[2], y2=b[3])
        for b, s, c in zip(boxes, scores, ids, strict=True)
    )
