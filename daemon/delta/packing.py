"""Pack region crops from many cameras onto shared model-size canvases (grid-aligned first fit, or shelves)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass


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
        placed, count = _pack_grid(sizes, canvas, gap, align)
        return [Placement(i, c, x, y) for i, c, x, y in placed], count
    return _pack_shelves(sizes, canvas, gap, align)


def pack_positions(sizes: Sequence[tuple[int, int]], canvas: int, gap: int = 0,
                   align: int = 1) -> tuple[list[tuple[int, int, int]], int]:
    """``pack`` as plain (canvas, x, y) tuples, the k-th for the k-th box (no Placement objects: the per-batch
    path), and the canvas count."""
    if align > 1 and canvas % align == 0:
        placed, count = _pack_grid(sizes, canvas, gap, align)
        return [(c, x, y) for _, c, x, y in placed], count
    shelved, count = _pack_shelves(sizes, canvas, gap, align)
    return [(p.canvas, p.x, p.y) for p in shelved], count


def _pack_shelves(sizes: Sequence[tuple[int, int]], canvas: int, gap: int, align: int) -> tuple[list[Placement], int]:
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


def _pack_grid(sizes: Sequence[tuple[int, int]], canvas: int, gap: int,
               align: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Bottom-left packing on a grid of ``align``-pixel cells (denser than shelves: boxes fill the holes that
    shorter neighbours leave). Each box takes the topmost, then leftmost, free position of the first canvas
    where it fits; a box's ``gap`` (>= 0) lies right of and below it, and may run off the canvas edge. Three
    orders are tried (largest area, tallest, widest first) and the one with the fewest canvases wins."""
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    n = canvas // align
    cells_of = {}  # per distinct size (regions repeat sizes): cw, ch, gw, gh cells (itself; itself and its gap)
    for w, h in set(sizes):
        cw, ch = -(-w // align), -(-h // align)
        if w > canvas or h > canvas or w <= 0 or h <= 0 or cw > n or ch > n:
            first_bad = next((w, h) for w, h in sizes if w > canvas or h > canvas or w <= 0 or h <= 0
                             or -(-w // align) > n or -(-h // align) > n)
            raise ValueError(f"region {first_bad[0]}x{first_bad[1]} does not fit a {canvas}x{canvas} canvas")
        cells_of[w, h] = (cw, ch, -(-(w + gap) // align), -(-(h + gap) // align))
    if not cells_of:
        return [], 0
    # occupancy bitboards hold the cells a gap may cover beyond the right and bottom edges too
    side = n + max(max(gw - cw, gh - ch) for cw, ch, gw, gh in cells_of.values())
    shapes = {box: (k, *_shape(box, n, side)) for k, box in enumerate(set(cells_of.values()))}  # numbered
    entry = {size: shapes[box] for size, box in cells_of.items()}
    boxes = [entry[size] for size in sizes]
    # the three orders' keys as one int each (cw, ch <= n < k): largest area, then tallest; tallest, then
    # widest; widest, then tallest (a stable sort: ties keep the input order)
    k = n + 1
    keys = [{size: -(cw * ch * k + ch) for size, (cw, ch, _, _) in cells_of.items()},
            {size: -(ch * k + cw) for size, (cw, ch, _, _) in cells_of.items()},
            {size: -(cw * k + ch) for size, (cw, ch, _, _) in cells_of.items()}]
    idx = range(len(sizes))
    best: tuple[list[tuple[int, int, int, int]], int] = ([], 0)
    bound = -(-sum(b[3] for b in boxes) // (n * n))  # no order can use fewer canvases than this
    tried: list[list[int]] = []
    for attempt, key_of in enumerate(keys):
        order = sorted(idx, key=[key_of[size] for size in sizes].__getitem__)
        if order in tried:  # the same order gives the same packing: it cannot be better
            continue
        tried.append(order)
        got = _place(order, boxes, len(shapes), n, side, best[1] if attempt else None)
        if got is not None:  # (a later order is given up once it needs as many canvases as the best one)
            best = got
        if len(sizes) <= 1 or best[1] <= bound:  # a later order must be strictly better to win
            break
    placed, count = best
    placed.sort()
    return [(i, c, x * align, y * align) for i, c, x, y in placed], count


_Shape = tuple[int, int, int, int, int, tuple[int, ...]]  # gw, gh, cells it needs, footprint, positions, shifts


@functools.lru_cache(maxsize=4096)
def _shape(box: tuple[int, int, int, int], n: int, side: int) -> _Shape:
    """What a box shape (cw, ch, gw, gh cells: itself, itself and its gap) needs on an ``n``-cell canvas whose
    bitboard rows are ``side`` bits: gw, gh, the canvas cells it needs, its footprint (the gap included) at position
    (0, 0), the positions its top-left cell may take (the box itself on the canvas), and the shifts that spread
    an occupied cell over every position whose footprint covers it (leftwards over ``gw`` columns, then upwards
    over ``gh`` rows, each by doubling)."""
    cw, ch, gw, gh = box
    foot = sum(((1 << gw) - 1) << (r * side) for r in range(gh))
    valid = sum(((1 << (n - cw + 1)) - 1) << (r * side) for r in range(n - ch + 1))
    return gw, gh, cw * ch, foot, valid, _doubling(gw, 1) + _doubling(gh, side)


def _doubling(length: int, unit: int) -> tuple[int, ...]:
    """Shifts s1, s2, ... such that ``a |= a >> s`` for each turns every set bit into a run of ``length`` bits
    (``unit`` apart) ending at it."""
    out: list[int] = []
    k = 1
    while k < length:
        step = min(k, length - k)
        out.append(step * unit)
        k += step
    return tuple(out)


def _place(order: list[int], boxes: list[tuple[int, int, int, int, int, int, tuple[int, ...]]], shapes: int,
           n: int, side: int,
           limit: int | None = None) -> tuple[list[tuple[int, int, int, int]], int] | None:
    """Each box at the first free position (topmost, then leftmost) of the first canvas where it fits: a list of
    (box, canvas, x cell, y cell) and the canvas count. ``boxes[i]``: box i's shape number (of ``shapes``), then
    its ``_shape``.

    A canvas is a bitboard of its occupancy (one Python int, row-major, ``side`` bits a row): the positions a
    box shape cannot take are the occupancy spread over the shape's footprint (a few shifts and ors of the whole
    board), so its first free position is the lowest bit left. Occupancy only grows, so a canvas where a shape
    found no room, or with fewer free cells than it needs, never has room for it later: each shape's search
    starts at the first canvas not yet ruled out for it."""
    occ: list[int] = []  # per canvas
    free: list[int] = []  # per canvas: free cells on the canvas itself (not the margin beyond it)
    first = [0] * shapes  # per box shape: the canvases before this one have no room for it
    placed: list[tuple[int, int, int, int]] = []
    count = 0
    for i in order:
        shape, gw, gh, need, foot, valid, spread = boxes[i]
        c = first[shape]
        while True:
            if c == count:
                if limit is not None and c + 1 >= limit:
                    return None  # not fewer canvases than ``limit``: this order cannot win
                occ.append(0)
                free.append(n * n)
                count += 1
                y = x = 0  # an empty canvas: its first free position
                break
            if free[c] >= need:
                blocked = occ[c]
                for s in spread:
                    blocked |= blocked >> s
                room = valid & ~blocked
                if room:
                    y, x = divmod((room & -room).bit_length() - 1, side)  # row-major: topmost, then leftmost
                    break
            c += 1
        first[shape] = c
        occ[c] |= foot << (y * side + x)
        free[c] -= (gh if y + gh <= n else n - y) * (gw if x + gw <= n else n - x)  # its cells on the canvas
        placed.append((i, c, x, y))
    return placed, count
