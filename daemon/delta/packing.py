"""Pack region crops from many cameras onto shared model-size canvases (shelf packing)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class Placement:
    index: int  # which input rect
    canvas: int
    x: int
    y: int


def _up(v: int, align: int) -> int:
    return -(-v // align) * align


def pack(sizes: Sequence[tuple[int, int]], canvas: int, gap: int = 0, align: int = 1) -> tuple[list[Placement], int]:
    """Place (w, h) boxes on ``canvas`` x ``canvas`` canvases; returns placements and the canvas count.

    Tallest first onto shelves; a box wider or taller than the canvas is an error (regions come from a frame
    letterboxed to the canvas size, so they always fit). ``gap`` pixels separate neighbours; every position is a
    multiple of ``align`` (regions cut on the model's stride grid keep their grid phase on the canvas, so the
    network sees them exactly as it sees them in the whole frame).
    """
    if align > 1 and canvas % align == 0:
        return _pack_grid(sizes, canvas, gap, align)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], -sizes[i][0]))
    placements: list[Placement] = []
    shelves: list[list[int]] = []  # per canvas: [shelf_y, shelf_h, cursor_x, next_shelf_y]
    for i in order:
        w, h = sizes[i]
        if w > canvas or h > canvas or w <= 0 or h <= 0:
            raise ValueError(f"region {w}x{h} does not fit a {canvas}x{canvas} canvas")
        for c, st in enumerate(shelves):
            shelf_y, shelf_h, cx, next_y = st
            if cx + w <= canvas and h <= shelf_h:
                placements.append(Placement(i, c, cx, shelf_y))
                st[2] = _up(cx + w + gap, align)
                break
            if next_y + h <= canvas:
                placements.append(Placement(i, c, 0, next_y))
                shelves[c] = [next_y, h, _up(w + gap, align), _up(next_y + h + gap, align)]
                break
        else:
            shelves.append([0, h, _up(w + gap, align), _up(h + gap, align)])
            placements.append(Placement(i, len(shelves) - 1, 0, 0))
    placements.sort(key=lambda p: p.index)
    return placements, len(shelves)


def _pack_grid(sizes: Sequence[tuple[int, int]], canvas: int, gap: int, align: int) -> tuple[list[Placement], int]:
    """Bottom-left packing on a grid of ``align``-pixel cells (denser than shelves: boxes fill the holes that
    shorter neighbours leave). Each box takes the topmost, then leftmost, free position of the first canvas
    where it fits; a box's ``gap`` lies right of and below it, and may run off the canvas edge. Three orders are
    tried (largest area, tallest, widest first) and the one with the fewest canvases wins."""
    n = canvas // align
    cells = [(-(-w // align), -(-h // align), -(-(w + gap) // align), -(-(h + gap) // align)) for w, h in sizes]
    for (w, h), (cw, ch, _, _) in zip(sizes, cells, strict=True):
        if w > canvas or h > canvas or w <= 0 or h <= 0 or cw > n or ch > n:
            raise ValueError(f"region {w}x{h} does not fit a {canvas}x{canvas} canvas")
    idx = range(len(sizes))
    best: tuple[list[Placement], int] = ([], 0)
    orders = ((lambda i: (-cells[i][0] * cells[i][1], -cells[i][1])), (lambda i: (-cells[i][1], -cells[i][0])),
              (lambda i: (-cells[i][0], -cells[i][1])))
    bound = -(-sum(cw * ch for cw, ch, _, _ in cells) // (n * n))  # no order can use fewer canvases than this
    tried: list[list[int]] = []
    for k, key in enumerate(orders):
        order = sorted(idx, key=key)
        if order in tried:  # the same order gives the same packing: it cannot be better
            continue
        tried.append(order)
        got = _place(order, cells, n, align, best[1] if k else None)
        if got is not None:  # (a later order is given up once it needs as many canvases as the best one)
            best = got
        if len(sizes) <= 1 or best[1] <= bound:  # a later order must be strictly better to win
            break
    return best


@dataclass(slots=True)
class _Canvas:
    sat: NDArray[np.int32]  # summed-area table of the occupancy (a free cell row/column beyond each edge)
    free: int  # free cells on the canvas itself (not the margin beyond it)
    failed: set[tuple[int, int, int, int]]  # box shapes that found no room since the last placement here


@functools.lru_cache(maxsize=4096)
def _ramp(start: int, length: int, side: int) -> NDArray[np.int32]:
    """How many of the cells [start, start + length) lie before each index 0..side: a placed box's share of a
    summed-area table is the outer product of its two ramps."""
    r = np.clip(np.arange(side + 1, dtype=np.int32) - start, 0, length).astype(np.int32)
    r.flags.writeable = False
    return r


def _place(order: list[int], cells: list[tuple[int, int, int, int]], n: int, align: int,
           limit: int | None = None) -> tuple[list[Placement], int] | None:
    """Each box at the first free position (topmost, then leftmost) of the first canvas where it fits. Each
    canvas keeps the summed-area table of its occupancy; a canvas with fewer free cells than the box needs, or
    where a box of the same shape found no room since its last placement, is passed over without looking."""
    canvases: list[_Canvas] = []
    placed: list[tuple[int, int, int, int]] = []
    extra = max(cells[i][2] - cells[i][0] for i in order) if order else 0
    extra = max(extra, max((cells[i][3] - cells[i][1] for i in order), default=0))
    side = n + extra  # occupancy: one free cell row/column beyond each edge
    for i in order:
        box = cells[i]
        cw, ch, gw, gh = box
        ny, nx = n - ch + 1, n - cw + 1  # the box itself must lie on the canvas; its gap may not
        for c in range(len(canvases) + 1):
            if c == len(canvases):
                if limit is not None and c + 1 >= limit:
                    return None  # not fewer canvases than ``limit``: this order cannot win
                cv = _Canvas(np.zeros((side + 1, side + 1), np.int32), n * n, set())
                canvases.append(cv)
                y = x = 0  # an empty canvas: its first free position
            else:
                cv = canvases[c]
                if cv.free < cw * ch or box in cv.failed:
                    continue
                s = cv.sat
                win = s[gh : gh + ny, gw : gw + nx] - s[:ny, gw : gw + nx] - s[gh : gh + ny, :nx] + s[:ny, :nx]
                first = int(win.argmin())  # row-major: the topmost, then leftmost, free position
                if win.flat[first] != 0:
                    cv.failed.add(box)
                    continue
                y, x = divmod(first, nx)
            cv.sat += np.multiply.outer(_ramp(y, gh, side), _ramp(x, gw, side))
            cv.free -= (min(y + gh, n) - y) * (min(x + gw, n) - x)
            cv.failed.clear()
            placed.append((i, c, x * align, y * align))
            break
    placed.sort()
    return [Placement(*p) for p in placed], len(canvases)
