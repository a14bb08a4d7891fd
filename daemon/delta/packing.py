"""Pack region crops from many cameras onto shared model-size canvases (shelf packing)."""

from __future__ import annotations

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
    for k, key in enumerate(orders):
        got = _place(sorted(idx, key=key), cells, n, align)
        if k == 0 or got[1] < best[1]:
            best = got
        if len(sizes) <= 1:
            break
    return best


def _place(order: list[int], cells: list[tuple[int, int, int, int]], n: int,
           align: int) -> tuple[list[Placement], int]:
    grids: list[NDArray[np.int32]] = []  # per canvas: occupancy, one free cell row/column beyond each edge
    placements: list[Placement] = []
    extra = max(cells[i][2] - cells[i][0] for i in order) if order else 0
    extra = max(extra, max((cells[i][3] - cells[i][1] for i in order), default=0))
    for i in order:
        cw, ch, gw, gh = cells[i]
        for c in range(len(grids) + 1):
            if c == len(grids):
                grids.append(np.zeros((n + extra, n + extra), np.int32))
            occ = grids[c]
            s = np.zeros((occ.shape[0] + 1, occ.shape[1] + 1), np.int32)
            s[1:, 1:] = occ.cumsum(0).cumsum(1)
            ny, nx = n - ch + 1, n - cw + 1  # the box itself must lie on the canvas; its gap may not
            win = s[gh : gh + ny, gw : gw + nx] - s[:ny, gw : gw + nx] - s[gh : gh + ny, :nx] + s[:ny, :nx]
            free = np.argwhere(win == 0)
            if free.size:
                y, x = (int(v) for v in free[0])
                occ[y : y + gh, x : x + gw] = 1
                placements.append(Placement(i, c, x * align, y * align))
                break
    placements.sort(key=lambda p: p.index)
    return placements, len(grids)
