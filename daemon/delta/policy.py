"""The delta policy: a pure function of (camera state, change map, clock) -> FULL | SKIP | REGIONS."""

from __future__ import annotations

import functools
import operator
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
    label_iou: float = 0.8  # a crop's new label on a published box (IoU >= this) waits for a FULL frame; 0: off
    keep_cut: bool = True  # a published box under a crop box that a crop edge cut stays (not "seen again")


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


@functools.cache
def _square(margin: int) -> NDArray[np.uint8]:
    k = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    k.flags.writeable = False
    return k


def regions_from_tiles(changed: NDArray[np.bool_], tile: int, margin: int, content: Rect) -> tuple[Rect, ...]:
    """Grow changed tiles by ``margin`` tiles, take connected groups, return their boxes clipped to ``content``."""
    if not changed.any():
        return ()
    (seeds,) = seed_boxes(changed[None], tile, margin, [_box4(content)])
    return tuple(Rect(*r) for r in seeds)


def seed_boxes(changed: NDArray[np.bool_], tile: int, margin: int,
               contents: Sequence[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """``regions_from_tiles`` of n maps of one shape at once, boxes as (x1, y1, x2, y2) tuples sorted by (y1, x1):
    the maps (n, ty, tx) are stacked into one image with ``max(margin, 1)`` zero rows after each, dilated once (the
    rows between are cleared again: what a map's dilation spilled there is not part of it, as at an image edge),
    and labelled once without its empty rows but one after each run (Spaghetti: cheaper than OpenCV's default,
    which goes parallel on a tall image; the stats cost per pixel, and most rows are empty). A map's
    groups are the same pixels as when it is labelled alone, so the same boxes; only the order of boxes with
    equal (y1, x1) may differ, which shape_regions' result does not depend on (its merges reach the same fixed
    point in any order, and its output, pairwise disjoint, is sorted with no ties)."""
    n, ty, tx = changed.shape
    if n == 1:  # one map (the CPU path plans frame by frame): no stacking, the boxes made one by one
        return [_seeds_of_one(changed[0], tile, margin, contents[0])]
    sep = max(margin, 1)
    band = ty + sep
    buf = np.zeros((n, band, tx), np.uint8)
    buf[:, :ty] = changed
    flat = buf.reshape(n * band, tx)
    if margin > 0:
        flat = np.asarray(cv2.dilate(flat, _square(margin)), dtype=np.uint8)
        flat.reshape(n, band, tx)[:, ty:] = 0
    out: list[list[tuple[int, int, int, int]]] = [[] for _ in range(n)]
    # labelled without the empty rows (most of them: the stats' cost goes with the pixels), one empty row kept after
    # each run of rows with changes so that runs stay apart; a group's rows are one run, mapped back by ``ys``
    rows = np.asarray(flat.view(np.uint64).any(axis=1) if tx % 8 == 0 else flat.any(axis=1))  # flat: C-contiguous
    keep = rows.copy()
    keep[1:] |= rows[:-1]
    if not rows.any():
        return out
    ys = np.flatnonzero(keep)
    k, _labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(flat[keep], 8, cv2.CV_32S,
                                                                         cv2.CCL_SPAGHETTI)
    if k <= 1:
        return out
    st = stats[1:k, :4].astype(np.int64)
    top = ys[st[:, 1]]
    bottom = ys[st[:, 1] + st[:, 3] - 1] + 1
    which = top // band
    c = np.asarray(contents, np.int64)[which]
    x1 = np.maximum(st[:, 0] * tile, c[:, 0])
    y1 = np.maximum((top - which * band) * tile, c[:, 1])
    x2 = np.minimum((st[:, 0] + st[:, 2]) * tile, c[:, 2])
    y2 = np.minimum((bottom - which * band) * tile, c[:, 3])
    order = np.lexsort((x1, y1, which))
    order = order[((x2 > x1) & (y2 > y1))[order]]
    for w, a, b, cc, d in zip(which[order].tolist(), x1[order].tolist(), y1[order].tolist(), x2[order].tolist(),
                              y2[order].tolist(), strict=True):
        out[w].append((a, b, cc, d))
    return out


_Box4 = tuple[int, int, int, int]  # x1, y1, x2, y2: a Rect while regions are shaped (cheaper to make)


def _seeds_of_one(changed: NDArray[np.bool_], tile: int, margin: int, c: _Box4) -> list[_Box4]:
    mask = changed.view(np.uint8) if changed.dtype == np.bool_ else changed.astype(np.uint8)
    if margin > 0:
        mask = np.asarray(cv2.dilate(mask, _square(margin)), dtype=np.uint8)
    n, _labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_SPAGHETTI)
    out = []
    for x, y, w, h, _area in stats[1:n].tolist():
        r = (max(x * tile, c[0]), max(y * tile, c[1]), min((x + w) * tile, c[2]), min((y + h) * tile, c[3]))
        if r[2] > r[0] and r[3] > r[1]:
            out.append(r)
    out.sort(key=lambda r: (r[1], r[0]))
    return out


_TOP_LEFT = operator.itemgetter(1, 0)  # a box's (y1, x1)


def _grow(r: _Box4, by: int, c: _Box4) -> _Box4:
    return max(r[0] - by, c[0]), max(r[1] - by, c[1]), min(r[2] + by, c[2]), min(r[3] + by, c[3])


def _merge(out: list[_Box4], gap: int) -> list[_Box4]:
    """merge_rects on tuples, in place. After a merge at (i, j) the scan goes on where a near pair can be: the
    pairs before it were apart and still are, except with the grown ``out[i]``. A pair is near when each one's
    start lies before the other's end + ``gap`` on both axes; it merges into its bounding box (written out, no
    helper calls, min and max as comparisons: this runs several times per frame)."""
    i = 0
    while i < len(out):
        ax1, ay1, ax2, ay2 = out[i]
        hx, hy = ax2 + gap, ay2 + gap
        for k in range(i):  # earlier rows: only their pair with the grown rect can have become near
            bx1, by1, bx2, by2 = out[k]
            if bx1 < hx and ax1 < bx2 + gap and by1 < hy and ay1 < by2 + gap:
                del out[i]
                out[k] = (bx1 if bx1 <= ax1 else ax1, by1 if by1 <= ay1 else ay1, bx2 if bx2 >= ax2 else ax2,
                          by2 if by2 >= ay2 else ay2)
                i = k
                break
        else:
            for j in range(i + 1, len(out)):
                bx1, by1, bx2, by2 = out[j]
                if bx1 < hx and ax1 < bx2 + gap and by1 < hy and ay1 < by2 + gap:
                    del out[j]
                    out[i] = (ax1 if ax1 <= bx1 else bx1, ay1 if ay1 <= by1 else by1, ax2 if ax2 >= bx2 else bx2,
                              ay2 if ay2 >= by2 else by2)
                    break
            else:
                i += 1
    return out


def _box4(r: Rect) -> _Box4:
    return r.x1, r.y1, r.x2, r.y2


def merge_rects(rects: Sequence[Rect], gap: int) -> list[Rect]:
    """Overlapping regions (or closer than ``gap``) become their bounding box, until none overlap: the first
    near pair (in index order) merges into the first one's place, then the scan starts again."""
    return [Rect(*t) for t in _merge([_box4(r) for r in rects], gap)]


def shape_regions(seeds: Sequence[Rect], boxes: Sequence[Rect], due: Sequence[Rect], params: DeltaParams,
                  content: Rect) -> tuple[Rect, ...]:
    """Changed-tile regions, grown so that every cached box they touch is inside whole with ``context_px``
    around it (a crop edge never cuts a known object), plus the due re-checks, merged where they overlap."""
    return tuple(Rect(*r) for r in shape_boxes([_box4(r) for r in seeds], [_box4(b) for b in boxes],
                                               [_box4(d) for d in due], params, _box4(content)))


def shape_boxes(seeds: list[_Box4], bx: Sequence[_Box4], due: Sequence[_Box4], params: DeltaParams,
                c: _Box4) -> list[_Box4]:
    """``shape_regions`` on (x1, y1, x2, y2) tuples (``seeds`` is consumed)."""
    ctx = params.context_px
    regions = _merge(seeds, params.merge_gap)
    cx1, cy1, cx2, cy2 = c
    if bx and regions:
        left = list(bx)  # not pulled in yet
        changed = True
        while changed:  # a region pulled a box in, grew, and may now touch another box
            changed = False
            rest = []
            for b in left:
                bx1, by1, bx2, by2 = b
                for i, (rx1, ry1, rx2, ry2) in enumerate(regions):
                    if rx1 < bx2 and bx1 < rx2 and ry1 < by2 and by1 < ry2:  # they overlap
                        # the region's union with the box grown by ctx within c (_grow; min, max as comparisons)
                        gx1, gy1, gx2, gy2 = bx1 - ctx, by1 - ctx, bx2 + ctx, by2 + ctx
                        gx1, gy1 = gx1 if gx1 >= cx1 else cx1, gy1 if gy1 >= cy1 else cy1
                        gx2, gy2 = gx2 if gx2 <= cx2 else cx2, gy2 if gy2 <= cy2 else cy2
                        regions[i] = (rx1 if rx1 <= gx1 else gx1, ry1 if ry1 <= gy1 else gy1,
                                      rx2 if rx2 >= gx2 else gx2, ry2 if ry2 >= gy2 else gy2)
                        changed = True
                        break
                else:
                    rest.append(b)
            left = rest
            if changed:
                regions = _merge(regions, params.merge_gap)
    if due:  # a due box that covers no content pixel (clipped to zero width, or the letterbox changed) is left out
        grown = [g for g in (_grow(d, ctx, c) for d in due) if g[2] > g[0] and g[3] > g[1]]
        regions = _merge(regions + grown, params.merge_gap)
    a = params.align
    if a > 1:  # on the stride grid, padding included where a region meets the letterbox border, but not past the
        # (square) model input, whose side the content's long side fills: a grid that does not divide it (align 64,
        # a 480 model) would reach beyond it
        side = max(cx2, cy2)
        snapped = []
        for x1, y1, x2, y2 in regions:
            ex, ey = -(-x2 // a) * a, -(-y2 // a) * a
            snapped.append((x1 // a * a, y1 // a * a, ex if ex <= side else side, ey if ey <= side else side))
        return sorted(_merge(snapped, 0), key=_TOP_LEFT)
    out = [(max(r[0], c[0]), max(r[1], c[1]), min(r[2], c[2]), min(r[3], c[3])) for r in regions]
    return sorted((r for r in out if r[2] > r[0] and r[3] > r[1]), key=_TOP_LEFT)


def precheck(state: CameraDeltaState, cmap: ChangeMap | None, now: float, params: DeltaParams,
             due: int) -> Verdict | None:
    """``decide``'s verdict where it needs no regions (``due``: how many re-checks are due); None otherwise."""
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
    n_changed = cmap.n_changed
    if state.drift_tiles + n_changed > params.drift_tiles:
        return Verdict(Decision.FULL, "drift bound")
    if n_changed == 0 and not due:
        return Verdict(Decision.SKIP, "no change")
    return None


def conclude(n_changed: int, seeds: list[_Box4], boxes: Sequence[_Box4], due: Sequence[_Box4],
             params: DeltaParams, content: _Box4) -> Verdict:
    """``decide``'s verdict after ``precheck`` found none, from the seeds (``seed_boxes``), as tuples."""
    regions = shape_boxes(seeds, boxes, due, params, content)
    if len(regions) > params.max_regions:
        return Verdict(Decision.FULL, f"{len(regions)} regions")
    area = (content[2] - content[0]) * (content[3] - content[1])
    if sum([(r[2] - r[0]) * (r[3] - r[1]) for r in regions]) > params.max_area_fraction * area:
        return Verdict(Decision.FULL, "regions cover most of the frame")
    return Verdict(Decision.REGIONS, f"{n_changed} tiles changed, {len(due)} re-checks",
                   tuple([Rect(*r) for r in regions]))


def decide(state: CameraDeltaState, cmap: ChangeMap | None, now: float, params: DeltaParams,
           content: Rect, boxes: Sequence[Rect] = (), due: Sequence[Rect] = ()) -> Verdict:
    """FULL when there is no reference, a keyframe is due, the change is large or drift passed its bound;
    SKIP when nothing changed and no cached box is due for a re-check; REGIONS otherwise.

    ``boxes``: the cached boxes (model-input pixels); ``due``: those (and vanished low-score boxes' places)
    whose re-check is due this frame."""
    early = precheck(state, cmap, now, params, len(due))
    if early is not None or cmap is None:
        return early or Verdict(Decision.FULL, "no reference")
    c = _box4(content)
    seeds = seed_boxes(cmap.changed[None], params.tile, params.margin_tiles, [c])[0] if cmap.n_changed else []
    return conclude(cmap.n_changed, seeds, [_box4(b) for b in boxes], [_box4(d) for d in due], params, c)


def advance(state: CameraDeltaState, verdict: Verdict, cmap: ChangeMap | None, now: float) -> CameraDeltaState:
    """The camera state after a frame was handled as ``verdict`` says."""
    if verdict.decision is Decision.FULL:
        return CameraDeltaState(True, 0, now, 0)
    changed = 0 if cmap is None else cmap.n_changed
    return CameraDeltaState(True, state.frames_since_key + 1, state.key_time, state.drift_tiles + changed)
