"""The post stage's host work for one batch: the decoded rows -> every frame's fresh boxes in source pixels, in
one pass of array operations over the whole batch (FULL rows and region crops on shared canvases alike), then
per frame the delta tracker's merge with the cached boxes.

Same arithmetic, box for box, as the per-frame code it replaces (tests/test_delta_post_equality.py): a row's
boxes pass when their score is > the camera's confidence (float32) and their class is wanted, the first
``max_detections`` of them per row; a region crop keeps the boxes whose centre lies on it and that no crop edge
inside the image cuts (``EDGE_PX``), moved back to model-input pixels and clipped to the region; then
``(box - pad) / scale`` clipped to the source image (daemon.decode.letterbox.boxes_to_source).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from daemon.delta.tracker import DeltaTracker, content_rect
from daemon.pipeline.prepare import Prepared
from daemon.pipeline.settings import CameraSettings
from daemon.types import Detection

EDGE_PX = 2.0  # a box edge this close to a crop edge inside the image: the crop cut the object

Published = tuple[tuple[Detection, ...], float]  # a frame's boxes and the age of the oldest information in them
SettingsOf = Callable[[str], CameraSettings | None]
PostFactory = Callable[[Sequence[Prepared], list[NDArray[np.float32]], SettingsOf, Sequence[str],
                        DeltaTracker | None, Callable[[], float]], Callable[[int], Published]]


class _Segments:
    """One entry per (frame, row) pair to read: a FULL frame's row, or one of a REGIONS frame's crops."""

    def __init__(self) -> None:
        self.item: list[int] = []
        self.row: list[int] = []
        self.conf: list[float] = []
        self.floor: list[float] = []  # CameraSettings.rank_floor, else the confidence (nothing below)
        self.max_det: list[int] = []
        self.classes: list[int] = []  # 0: every class; k: class set k - 1
        self.region: list[bool] = []
        self.geo: list[tuple[int, int, int, int, int, int, bool, bool, bool, bool]] = []  # crops only


def _segments(items: Sequence[Prepared], settings: Sequence[CameraSettings | None],
              class_sets: list[frozenset[int]]) -> _Segments:
    sg = _Segments()
    set_index: dict[frozenset[int], int] = {}
    for k, (it, s) in enumerate(zip(items, settings, strict=True)):
        if s is None or (it.slot < 0 and not it.placements):
            continue
        cls = 0
        if s.class_ids is not None:
            cls = set_index.get(s.class_ids, 0)
            if not cls:
                class_sets.append(s.class_ids)
                cls = set_index[s.class_ids] = len(class_sets)
        if it.slot >= 0:
            sg.item.append(k)
            sg.row.append(it.slot)
            sg.conf.append(s.confidence)
            sg.floor.append(s.confidence if s.rank_floor is None else min(s.rank_floor, s.confidence))
            sg.max_det.append(s.max_detections)
            sg.classes.append(cls)
            sg.region.append(False)
            continue
        c = content_rect(it.letterbox)
        for p in it.placements:
            r = p.region
            sg.item.append(k)
            sg.row.append(p.slot)
            sg.conf.append(s.confidence)
            sg.floor.append(s.confidence if s.rank_floor is None else min(s.rank_floor, s.confidence))
            sg.max_det.append(s.max_detections)
            sg.classes.append(cls)
            sg.region.append(True)
            sg.geo.append((p.x, p.y, r.x1, r.y1, r.x2, r.y2,
                           r.x1 <= c.x1, r.y1 <= c.y1, r.x2 >= c.x2, r.y2 >= c.y2))
    return sg


def fresh_boxes(items: Sequence[Prepared], settings: Sequence[CameraSettings | None],
                decoded: Sequence[NDArray[np.float32]],
                cut: list[tuple[NDArray[np.float32], NDArray[np.intp]]] | None = None,
                dropped: list[int] | None = None,
                below: list[tuple[NDArray[np.float32], NDArray[np.intp]]] | None = None,
                ) -> tuple[NDArray[np.float32], NDArray[np.intp]]:
    """Every frame's fresh boxes: (M, 6) float32 x1, y1, x2, y2 (source pixels of its view), score, class, the
    frames' boxes one after the other in item order, and ``bounds`` (len(items) + 1): frame k's boxes are rows
    ``bounds[k]:bounds[k + 1]``. ``cut``, when given, receives the same for the crop boxes a crop edge inside the
    image cut (left out of the fresh boxes; the tracker keeps the cached boxes under them). A decoded box with a
    NaN or infinite value (a corrupt engine output) is left out; ``dropped``, when given, receives how many of
    the rows read held one. ``below``, when given, receives the same for the boxes scored at or under the
    confidence, down to the camera's ``rank_floor`` (fidelity runs; same class and crop rules, no count cut)."""
    n_items = len(items)
    empty = np.zeros((0, 6), np.float32), np.zeros(n_items + 1, np.intp)
    if not decoded:
        return empty
    class_sets: list[frozenset[int]] = []
    sg = _segments(items, settings, class_sets)
    if not sg.item:
        return empty
    lens = np.fromiter((len(d) for d in decoded), np.intp, len(decoded))
    starts = np.cumsum(lens) - lens
    allrows = np.concatenate(decoded) if len(decoded) > 1 else np.asarray(decoded[0])
    seg_rows = np.asarray(sg.row, np.intp)
    seg_lens = lens[seg_rows]
    total = int(seg_lens.sum())
    if total == 0:
        return empty
    n_seg = len(sg.item)
    seg = np.repeat(np.arange(n_seg), seg_lens)
    first = np.cumsum(seg_lens) - seg_lens
    at = starts[seg_rows][seg] + (np.arange(total) - first[seg])
    b = allrows[at]
    finite = np.asarray(np.isfinite(allrows).all(axis=1))
    if dropped is not None and not finite.all():
        read = np.zeros(len(allrows), np.bool_)
        read[at] = True  # a canvas row that several crops read counts once
        dropped.append(int(np.count_nonzero(read & ~finite)))
    # the camera's filter on the row, then its first max_detections boxes (per row, as the row decoder cuts)
    above = b[:, 4] > np.asarray(sg.conf, np.float32)[seg]
    keep = finite[at] & above
    lo = finite[at] & ~above & (b[:, 4] > np.asarray(sg.floor, np.float32)[seg]) if below is not None else None
    if class_sets:
        width = max(max(s) for s in class_sets if s) + 1 if any(class_sets) else 1
        allowed = np.zeros((len(class_sets) + 1, width), np.bool_)
        for k, s in enumerate(class_sets, 1):
            allowed[k, list(s)] = True
        cls = b[:, 5]
        ok = (cls >= 0) & (cls < width) & (cls == np.floor(cls))  # NaN: False (no cast of NaN or 1e20 to int)
        ci = np.where(ok, cls, 0).astype(np.int64)
        sets = np.asarray(sg.classes, np.intp)[seg]
        wanted = (sets == 0) | (ok & allowed[sets, ci])
        keep &= wanted
        if lo is not None:
            lo &= wanted
    cs = np.cumsum(keep)
    before = np.concatenate(([0], cs))[first]  # kept boxes ahead of each segment (one that found none may be last)
    keep &= (cs - before[seg]) <= np.asarray(sg.max_det, np.intp)[seg]
    region = np.asarray(sg.region, np.bool_)
    if sg.geo:
        whole, inside = _on_crop(b, seg, region, sg.geo)
        if cut is not None:
            cut.append(_finish(b, seg, keep & region[seg] & inside & ~whole, region, sg, items))
        keep &= ~region[seg] | whole
        if lo is not None:
            lo &= ~region[seg] | whole
    if below is not None and lo is not None:
        below.append(_finish(b, seg, lo, region, sg, items))
    return _finish(b, seg, keep, region, sg, items)


def _finish(b: NDArray[np.float32], seg: NDArray[np.intp], keep: NDArray[np.bool_], region: NDArray[np.bool_],
            sg: _Segments, items: Sequence[Prepared]) -> tuple[NDArray[np.float32], NDArray[np.intp]]:
    """The boxes ``keep`` marks, in source pixels, grouped by frame, with their bounds."""
    n_items = len(items)
    kept = np.flatnonzero(keep)
    out = b[kept]
    sk = seg[kept]
    if sg.geo:
        _to_input(out, sk, region, sg.geo)
    it = np.asarray(sg.item, np.intp)[sk]
    _to_source(out, it, items)
    bounds = np.zeros(n_items + 1, np.intp)
    np.cumsum(np.bincount(it, minlength=n_items), out=bounds[1:])
    return out, bounds


def _geo_columns(region: NDArray[np.bool_], geo: list[tuple[int, int, int, int, int, int, bool, bool, bool, bool]]
                 ) -> NDArray[np.float32]:
    """Per segment: px, py, rx1, ry1, rx2, ry2, and the four 'edge at the image border' flags (1/0)."""
    g = np.zeros((len(region), 10), np.float32)
    g[region] = np.asarray(geo, np.float32)
    return g


def _on_crop(b: NDArray[np.float32], seg: NDArray[np.intp], region: NDArray[np.bool_],
             geo: list[tuple[int, int, int, int, int, int, bool, bool, bool, bool]]
             ) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(boxes on their crop and not cut by a crop edge inside the image, boxes whose centre is on their crop)."""
    g = _geo_columns(region, geo)[seg]
    px, py, w, h = g[:, 0], g[:, 1], g[:, 4] - g[:, 2], g[:, 5] - g[:, 3]
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    e = np.float32(EDGE_PX)
    inside = (cx >= px) & (cx < px + w) & (cy >= py) & (cy < py + h)
    keep = inside.copy()
    # a box cut by a crop edge inside the image is a part of an object: the cached box stays instead
    keep &= (g[:, 6] != 0) | (b[:, 0] > px + e)
    keep &= (g[:, 7] != 0) | (b[:, 1] > py + e)
    keep &= (g[:, 8] != 0) | (b[:, 2] < px + w - e)
    keep &= (g[:, 9] != 0) | (b[:, 3] < py + h - e)
    return keep, inside


def _to_input(out: NDArray[np.float32], sk: NDArray[np.intp], region: NDArray[np.bool_],
              geo: list[tuple[int, int, int, int, int, int, bool, bool, bool, bool]]) -> None:
    """Crop boxes (canvas pixels) -> model-input pixels, clipped to their region; FULL rows' boxes untouched."""
    rows = np.flatnonzero(region[sk])
    if rows.size == 0:
        return
    g = _geo_columns(region, geo)[sk[rows]]
    for col, (lo, hi, at) in enumerate(((2, 4, 0), (3, 5, 1), (2, 4, 0), (3, 5, 1))):
        out[rows, col] = np.clip(out[rows, col] + (g[:, lo] - g[:, at]), g[:, lo], g[:, hi])


def _to_source(out: NDArray[np.float32], it: NDArray[np.intp], items: Sequence[Prepared]) -> None:
    lbs = np.asarray([(i.letterbox.pad_x, i.letterbox.pad_y, i.letterbox.scale, i.letterbox.src_w,
                       i.letterbox.src_h) for i in items], np.float64)[it]
    pad = lbs[:, :2].astype(np.float32)
    scale = lbs[:, 2].astype(np.float32)
    size = lbs[:, 3:5].astype(np.float32)
    for col in range(4):
        xy = col % 2
        out[:, col] = np.clip((out[:, col] - pad[:, xy]) / scale, np.float32(0), size[:, xy])


class BatchDetections:
    """A batch's published boxes, frame by frame: ``self(k)`` -> (boxes, age) of ``items[k]``; call in item
    order (the tracker's cached boxes follow the frames)."""

    def __init__(self, items: Sequence[Prepared], decoded: list[NDArray[np.float32]], settings_of: SettingsOf,
                 names: Sequence[str], delta: DeltaTracker | None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._items = items
        self._settings = [settings_of(i.frame.camera) for i in items]
        self._names = names
        self._delta = delta
        self._clock = clock
        cut: list[tuple[NDArray[np.float32], NDArray[np.intp]]] = []
        dropped: list[int] = []
        lo: list[tuple[NDArray[np.float32], NDArray[np.intp]]] | None = \
            [] if any(s is not None and s.rank_floor is not None for s in self._settings) else None
        out, bounds = fresh_boxes(items, self._settings, decoded, cut if delta is not None else None, dropped, lo)
        self._below = lo[0] if lo else None
        self.dropped = dropped[0] if dropped else 0  # decoded boxes with a NaN/inf value, left out
        self._cut = cut[0] if cut and len(cut[0][0]) else None
        self._bounds = bounds.tolist()
        self._xyxy: list[list[float]] = out[:, :4].tolist()
        self._scores: list[float] = out[:, 4].tolist()
        self._ids: list[int] = out[:, 5].astype(np.int64).tolist()

    def fresh(self, k: int) -> tuple[Detection, ...]:
        names, n = self._names, len(self._names)
        xyxy, scores, ids = self._xyxy, self._scores, self._ids
        a, z = self._bounds[k], self._bounds[k + 1]
        out = []
        for j in range(a, z):
            c, b = ids[j], xyxy[j]
            out.append(Detection(c, names[c] if 0 <= c < n else f"class{c}", scores[j], b[0], b[1], b[2], b[3]))
        return tuple(out)

    def _cut_of(self, k: int) -> tuple[Detection, ...]:
        return self._rows_of(self._cut, k)

    def _rows_of(self, part: tuple[NDArray[np.float32], NDArray[np.intp]] | None, k: int) -> tuple[Detection, ...]:
        if part is None:
            return ()
        out, bounds = part
        a, z = int(bounds[k]), int(bounds[k + 1])
        names, n = self._names, len(self._names)
        return tuple(Detection(int(c), names[int(c)] if 0 <= c < n else f"class{int(c)}", float(r[4]),
                               float(r[0]), float(r[1]), float(r[2]), float(r[3]))
                     for r, c in zip(out[a:z], out[a:z, 5].astype(np.int64), strict=True))

    def __call__(self, k: int) -> Published:
        item = self._items[k]
        if self._settings[k] is None:
            return (), 0.0
        dets, age = self.fresh(k), 0.0
        if self._delta is not None and item.verdict.reason != "delta off":
            dets, age = self._delta.resolve(item.frame.camera, item.verdict, dets, item.letterbox, self._clock(),
                                            whole_frame=item.features, cut=self._cut_of(k))
        return _shifted(dets, item.offset), age

    def below(self, k: int) -> tuple[Detection, ...]:
        """Frame k's below-threshold candidates (CameraSettings.rank_floor; fidelity runs), cached like the
        published boxes; call after ``self(k)``. Empty when no camera has a floor."""
        item = self._items[k]
        s = self._settings[k]
        if s is None or s.rank_floor is None:
            return ()
        lo = self._rows_of(self._below, k)
        if self._delta is not None and item.verdict.reason != "delta off":
            lo = self._delta.resolve_below(item.frame.camera, item.verdict, lo, self.fresh(k), item.letterbox,
                                           self._clock(), whole_frame=item.features)
        return _shifted(lo, item.offset)


def _shifted(dets: tuple[Detection, ...], offset: tuple[int, int]) -> tuple[Detection, ...]:
    """Boxes of a ROI's view moved to the source image (the ROI's origin added)."""
    ox, oy = offset
    if not (ox or oy):
        return dets
    return tuple(Detection(d.class_id, d.class_name, d.score, d.x1 + ox, d.y1 + oy, d.x2 + ox, d.y2 + oy,
                           d.cached, d.age_s) for d in dets)


def source_regions(item: Prepared) -> tuple[tuple[float, float, float, float], ...]:
    """The frame's processed regions in source pixels (daemon.delta.tracker.to_source, plus the ROI origin)."""
    lb = item.letterbox
    ox, oy = item.offset
    px, py, s = lb.pad_x, lb.pad_y, lb.scale
    return tuple(((r.x1 - px) / s + ox, (r.y1 - py) / s + oy, (r.x2 - px) / s + ox, (r.y2 - py) / s + oy)
                 for r in item.verdict.regions)
