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
    def inside(d: Detection) -> bool:
        cx, cy = _center(d)
        return any(r.contains(cx, cy) for r in regions)

    def covered(d: Detection) -> bool:
        return any(r.x1 <= d.x1 and d.x2 <= r.x2 and r.y1 <= d.y1 and d.y2 <= r.y2 for r in regions)

    new = [d for d in fresh if inside(d)]
    kept = [
        d for d in cached
        if not covered(d) and not any(f.class_id == d.class_id and box_iou(f, d) > iou for f in new)
    ]
    return tuple(kept + new)


def age_boxes(boxes: Sequence[Detection], born: Sequence[float], now: float) -> tuple[Detection, ...]:
    """Mark boxes inferred before ``now`` as cached with their age."""
    return tuple(
        replace(d, cached=now > t, age_s=max(0.0, now - t)) for d, t in zip(boxes, born, strict=True)
    )
