"""The delta policy: a pure function of (camera state, change map, clock) -> FULL | SKIP | REGIONS."""

from __future__ import annotations

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
    tile: int = 32  # model-input pixels per tile side
    keyframe_frames: int = 30  # a FULL frame at least every N frames ...
    keyframe_s: float = 5.0  # ... and every T seconds
    full_fraction: float = 0.45  # changed tiles above this fraction: FULL
    brightness_full: float = 20.0  # |median luma shift| above this: lights changed, FULL
    drift_tiles: int = 400  # changed tiles summed since the keyframe above this: FULL
    margin_tiles: int = 2  # changed tiles grow by this many tiles before forming regions
    max_regions: int = 16  # more regions than this: FULL
    max_area_fraction: float = 0.7  # regions covering more of the frame than this: FULL
    noise_k: float = 3.0  # tile threshold = max(min_threshold, noise_k * noise floor)
    min_threshold: float = 6.0


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


def decide(state: CameraDeltaState, cmap: ChangeMap | None, now: float, params: DeltaParams,
           content: Rect) -> Verdict:
    """FULL when there is no reference, a keyframe is due, the change is large or drift passed its bound;
    SKIP when nothing changed; REGIONS otherwise."""
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
    if n_changed == 0:
        return Verdict(Decision.SKIP, "no change")
    regions = regions_from_tiles(cmap.changed, params.tile, params.margin_tiles, content)
    if len(regions) > params.max_regions:
        return Verdict(Decision.FULL, f"{len(regions)} regions")
    if sum(r.area for r in regions) > params.max_area_fraction * content.area:
        return Verdict(Decision.FULL, "regions cover most of the frame")
    return Verdict(Decision.REGIONS, f"{n_changed} tiles changed", regions)


def advance(state: CameraDeltaState, verdict: Verdict, cmap: ChangeMap | None, now: float) -> CameraDeltaState:
    """The camera state after a frame was handled as ``verdict`` says."""
    if verdict.decision is Decision.FULL:
        return CameraDeltaState(True, 0, now, 0)
    changed = 0 if cmap is None else int(cmap.changed.sum())
    return CameraDeltaState(True, state.frames_since_key + 1, state.key_time, state.drift_tiles + changed)
