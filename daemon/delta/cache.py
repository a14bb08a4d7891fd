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
    rs = [(r.x1, r.y1, r.x2, r.y2) for r in regions]
    new: list[Detection] = []
    for d in fresh:  # its centre in a region (SourceRect.contains)
        cx, cy = _center(d)
        if any(x1 <= cx < x2 and y1 <= cy < y2 for x1, y1, x2, y2 in rs):
            new.append(d)
    kept: list[Detection] = []
    for d in cached:
        if any(x1 <= d.x1 and d.x2 <= x2 and y1 <= d.y1 and d.y2 <= y2 for x1, y1, x2, y2 in rs):
            continue  # wholly inside a processed region: seen again
        c = d.class_id
        if any(f.class_id == c and box_iou(f, d) > iou for f in new):
            continue
        kept.append(d)
    return (*kept, *new)


def age_boxes(boxes: Sequence[Detection], born: Sequence[float], now: float) -> tuple[Detection, ...]:
    """Mark boxes inferred before ``now`` as cached with their age."""
    return tuple(
        replace(d, cached=now > t, age_s=max(0.0, now - t)) for d, t in zip(boxes, born, strict=True)
    )
