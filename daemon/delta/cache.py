"""Per-camera cached detections and how fresh region detections replace them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from daemon.types import Detection


@dataclass(frozen=True, slots=True)
class SourceRect:
    """A processed region in source pixels."""

    x1: float
    y1: float
    x2: float
    y2: float

    def contains(self, x: float, y: float) -> bool:
        return self.x1 <= x < self.x2 and self.y1 <= y < self.y2


def _center(d: Detection) -> tuple[float, float]:
    return (d.x1 + d.x2) / 2.0, (d.y1 + d.y2) / 2.0


def box_iou(a: Detection, b: Detection) -> float:
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def merge_regions(
    cached: Sequence[Detection], fresh: Sequence[Detection], regions: Sequence[SourceRect], iou: float = 0.3
) -> tuple[Detection, ...]:
    """Inside the processed regions the fresh boxes win; outside them the cached boxes stay.

    A cached box is replaced when it lies wholly inside a processed region (whatever was there was seen again).

    A cached box that overlaps a fresh box of its class by more than ``iou`` is the same object seen again (it
    moved across a region border) and goes too.
    """
    kept, new = merge_split(cached, fresh, [(r.x1, r.y1, r.x2, r.y2) for r in regions], iou)
    return (*(cached[k] for k in kept), *new)


def merge_split(cached: Sequence[Detection], fresh: Sequence[Detection],
                rs: Sequence[tuple[float, float, float, float]], iou: float = 0.3) -> tuple[list[int], list[Detection]]:
    """``merge_regions`` as (indices of the cached boxes that stay, the fresh boxes that count), regions given as
    (x1, y1, x2, y2) tuples: the tracker keeps its own records of the cached boxes by index."""
    new: list[Detection] = []
    by_class: dict[int, list[tuple[float, float, float, float]]] = {}
    for d in fresh:  # its centre in a region (SourceRect.contains)
        cx, cy = (d.x1 + d.x2) / 2.0, (d.y1 + d.y2) / 2.0
        for x1, y1, x2, y2 in rs:
            if x1 <= cx < x2 and y1 <= cy < y2:
                new.append(d)
                by_class.setdefault(d.class_id, []).append((d.x1, d.y1, d.x2, d.y2))
                break
    kept: list[int] = []
    for k, d in enumerate(cached):
        bx1, by1, bx2, by2 = d.x1, d.y1, d.x2, d.y2
        for x1, y1, x2, y2 in rs:
            if x1 <= bx1 and bx2 <= x2 and y1 <= by1 and by2 <= y2:
                break  # wholly inside a processed region: seen again
        else:
            same = by_class.get(d.class_id)
            if not same or not any(_iou4(f, bx1, by1, bx2, by2) > iou for f in same):
                kept.append(k)
    return kept, new


def _iou4(a: tuple[float, float, float, float], bx1: float, by1: float, bx2: float, by2: float) -> float:
    """box_iou(a, b) on coordinates, the same operations in the same order."""
    iw = min(a[2], bx2) - max(a[0], bx1)
    ih = min(a[3], by2) - max(a[1], by1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def age_boxes(boxes: Sequence[Detection], born: Sequence[float], now: float) -> tuple[Detection, ...]:
    """Mark boxes inferred before ``now`` as cached with their age."""
    return tuple(
        replace(d, cached=now > t, age_s=max(0.0, now - t)) for d, t in zip(boxes, born, strict=True)
    )
