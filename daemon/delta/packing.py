"""Pack region crops from many cameras onto shared model-size canvases (shelf packing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    index: int  # which input rect
    canvas: int
    x: int
    y: int


def pack(sizes: Sequence[tuple[int, int]], canvas: int, gap: int = 0) -> tuple[list[Placement], int]:
    """Place (w, h) boxes on ``canvas`` x ``canvas`` canvases; returns placements and the canvas count.

    Tallest first onto shelves; a box wider or taller than the canvas is an error (regions come from a frame
    letterboxed to the canvas size, so they always fit). ``gap`` pixels separate neighbours.
    """
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
                st[2] = cx + w + gap
                break
            if next_y + h <= canvas:
                placements.append(Placement(i, c, 0, next_y))
                shelves[c] = [next_y, h, w + gap, next_y + h + gap]
                break
        else:
            shelves.append([0, h, w + gap, h + gap])
            placements.append(Placement(i, len(shelves) - 1, 0, 0))
    placements.sort(key=lambda p: p.index)
    return placements, len(shelves)
