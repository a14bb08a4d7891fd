"""The delta policy: a pure function of (camera state, change map, clock) -> FULL | SKIP | REGIONS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.delta.changemap import ChangeMap


class Decision(StrEnum):
    FULL = "full"
    SKIP = "skip"
    REGIONS = "regions"


@dataclass(frozen=True, slots=True)
class DeltaParams:
    tile: int = 16  # model-input pixels per tile side
    keyframe_frames: int = 10  # a FULL frame at least every N frames ...
    keyframe_s: float = 5.0  # ... and every T seconds
    full_fraction: float = 0.45  # changed tiles above this fraction: FULL
    brightness_full: float = 20.0  # |median luma shift| above this: lights changed, FULL
    drift_tiles: int = 3000  # changed tiles summed since the keyframe above this: FULL
    margin_tiles: int = 1  # changed tiles grow by this many tiles before forming regions
    max_regions: int = 16  # more regions than this: FULL
    max_area_fraction: float = 0.7  # regions covering more of the frame than this: FULL
    noise_k: float = 3.0  # tile threshold = max(min_threshold, noise_k * noise floor)
    min_threshold: float = 6.0
    context_px: int = 16  # a cached box touched by a region is pulled in whole, with this much context around it
    recheck_frames: int = 0  # every cached box is re-inferred (box + context) at least every N frames; 0: never
    recheck_score: float = 0.0  # cached boxes scoring below this are re-inferred every frame ...
    ghost_frames: int = 0  # ... and where such a box vanished, its place is re-checked for this many frames
    merge_gap: int = 16  # regions closer than this (model-input pixels) become one region
    align: int = 32  # region edges snap outwards to this grid of model-input pixels (32: the model's stride)


@dataclass(frozen=True, slots=True)
class CameraDeltaState:
    has_reference: bool = False
    frames_since_key: int = 0
    key_time: float = 0.0
    drift_tiles: int = 0


@dataclass(frozen=True, slots=True)
class Rect:
    """A region in model-input pixels, [x1, x2) x [y1, y2)."""

    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def area(self) -> int:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    reason: str
    regions: tuple[Rect, ...] = ()


def regions_from_tiles(changed: NDArray[np.bool_], tile: int, margin: int, content: Rect) -> tuple[Rect, ...]:
    """Grow changed tiles by ``margin`` tiles, take connected groups, return their boxes clipped to ``content``."""
    if not changed.any():
        return ()
    mask = changed.astype(np.uint8)
    if margin > 0:
        mask = np.asarray(cv2.dilate(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)), dtype=np.uint8)
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    out = []
    for i in range(1, n):
        x, y, w, h = (int(v) for v in stats[i, :4])
        r = Rect(max(x * tile, content.x1), max(y * tile, content.y1),
                 min((x + w) * tile, content.x2), min((y + h) * tile, content.y2))
        if r.x2 > r.x1 and r.y2 > r.y1:
            out.append(r)
    return tuple(sorted(out, key=lambda r: (r.y1, r.x1)))


def _grow(r: Rect, by: int, content: Rect) -> Rect:
    return Rect(max(r.x1 - by, content.x1), max(r.y1 - by, content.y1),
                min(r.x2 + by, content.x2), min(r.y2 + by, content.y2))


def _near(a: Rect, b: Rect, gap: int) -> bool:
    return a.x1 < b.x2 + gap and b.x1 < a.x2 + gap and a.y1 < b.y2 + gap and b.y1 < a.y2 + gap


def _union(a: Rect, b: Rect) -> Rect:
    return Rect(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2))


def merge_rects(rects: Sequence[Rect], gap: int) -> list[Rect]:
    """Overlapping regions (or closer than ``gap``) become their bounding box, until none overlap."""
    out = list(rects)
    merged = True
    while merged:
        merged = False
        for i in range(len(out)):
            for j in range(i + 1, len(out)):
                if _near(out[i], out[j], gap):
                    out[i] = _union(out[i], out.pop(j))
                    merged = True
                    break
            if merged:
                break
    return out


def shape_regions(seeds: Sequence[Rect], boxes: Sequence[Rect], due: Sequence[Rect], params: DeltaParams,
                  content: Rect) -> tuple[Rect, ...]:
    """Changed-tile regions, grown so that every cached box they touch is inside whole with ``context_px``
    around it (a crop edge never cuts a known object), plus the due re-checks, merged where they overlap."""
    ctx = params.context_px
    regions = merge_rects(list(seeds), params.merge_gap)
    if boxes:
        grown = [_grow(b, ctx, content) for b in boxes]
        pulled = [False] * len(grown)
        changed = True
        while changed:  # a region pulled a box in, grew, and may now touch another box
            changed = False
            for k, g in enumerate(grown):
                if pulled[k]:
                    continue
                for i, r in enumerate(regions):
                    if _near(r, boxes[k], 0):
                        regions[i] = _union(r, g)
                        pulled[k] = changed = True
                        break
            if changed:
                regions = merge_rects(regions, params.merge_gap)
    regions = merge_rects(regions + [_grow(d, ctx, content) for d in due], params.merge_gap)
    a = params.align
    if a > 1:  # on the stride grid, padding included where a region meets the letterbox border
        regions = merge_rects([Rect(r.x1 // a * a, r.y1 // a * a, -(-r.x2 // a) * a, -(-r.y2 // a) * a)
                               for r in regions], 0)
        return tuple(sorted(regions, key=lambda r: (r.y1, r.x1)))
    out = [Rect(max(r.x1, content.x1), max(r.y1, content.y1), min(r.x2, content.x2), min(r.y2, content.y2))
           for r in regions]
    return tuple(sorted((r for r in out if r.x2 > r.x1 and r.y2 > r.y1), key=lambda r: (r.y1, r.x1)))


def decide(state: CameraDeltaState, cmap: ChangeMap | None, now: float, params: DeltaParams,
           content: Rect, boxes: Sequence[Rect] = (), due: Sequence[Rect] = ()) -> Verdict:
    """FULL when there is no reference, a keyframe is due, the change is large or drift passed its bound;
    SKIP when nothing changed and no cached box is due for a re-check; REGIONS otherwise.

    ``boxes``: the cached boxes (model-input pixels); ``due``: those (and vanished low-score boxes' places)
    whose re-check is due this frame."""
    if not state.has_reference or cmap is None:
        return Verdict(Decision.FULL, "no reference")
    if state.frames_since_key + 1 >= params.keyframe_frames:
        return Verdict(Decision.FULL, "keyframe due (frames)")
    if now - state.key_time >= params.keyframe_s:
        return Verdict(Decision.FULL, "keyframe due (time)")
    if abs(cmap.brightness_shift) > params.brightness_full:
        return Verdict(Decision.FULL, f"brightness shift {cmap.brightness_shift:+.0f}")
    if cmap.changed_fraction > params.full_fraction:
        return Verdict(Decision.FULL, f"{cmap.changed_fraction:.0%} of tiles changed")
    n_changed = int(cmap.changed.sum())
    if state.drift_tiles + n_changed > params.drift_tiles:
        return Verdict(Decision.FULL, "drift bound")
    if n_changed == 0 and not due:
        return Verdict(Decision.SKIP, "no change")
    seeds = regions_from_tiles(cmap.changed, params.tile, params.margin_tiles, content)
    regions = shape_regions(seeds, boxes, due, params, content)
    if len(regions) > params.max_regions:
        return Verdict(Decision.FULL, f"{len(regions)} regions")
    if sum(r.area for r in regions) > params.max_area_fraction * content.area:
        return Verdict(Decision.FULL, "regions cover most of the frame")
    return Verdict(Decision.REGIONS, f"{n_changed} tiles changed, {len(due)} re-checks", regions)


def advance(state: CameraDeltaState, verdict: Verdict, cmap: ChangeMap | None, now: float) -> CameraDeltaState:
    """The camera state after a frame was handled as ``verdict`` says."""
    if verdict.decision is Decision.FULL:
        return CameraDeltaState(True, 0, now, 0)
    changed = 0 if cmap is None else int(cmap.changed.sum())
    return CameraDeltaState(True, state.frames_since_key + 1, state.key_time, state.drift_tiles + changed)
