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


def merge_regions(
    cached: Sequence[Detection], fresh: Sequence[Detection], regions: Sequence[SourceRect]
) -> tuple[Detection, ...]:
    """Inside the processed regions the fresh boxes win; outside them the cached boxes stay."""
    def inside(d: Detection) -> bool:
        cx, cy = _center(d)
        return any(r.contains(cx, cy) for r in regions)

    kept = [d for d in cached if not inside(d)]
    return tuple(kept + [d for d in fresh if inside(d)])


def age_boxes(boxes: Sequence[Detection], born: Sequence[float], now: float) -> tuple[Detection, ...]:
    """Mark boxes inferred before ``now`` as cached with their age."""
    return tuple(
        replace(d, cached=now > t, age_s=max(0.0, now - t)) for d, t in zip(boxes, born, strict=True)
    )
