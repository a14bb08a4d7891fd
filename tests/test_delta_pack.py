"""The bitboard grid packer (daemon.delta.packing) against the definition of its first fit, and the GPU
preparer's host-side layout (daemon.gpu.prepare.lay_out) on synthetic frames; no device needed."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.delta.packing import Placement, pack, pack_positions
from daemon.delta.policy import Decision, Rect, Verdict
from daemon.delta.tracker import content_rect
from daemon.gpu.prepare import DecodedRow, lay_out
from daemon.types import Frame, Letterbox


def _definition(sizes: list[tuple[int, int]], canvas: int, gap: int, align: int) -> tuple[list[Placement], int]:
    """Every canvas, every position in row-major order, for each of the three orders; the fewest canvases win
    (the first order on a tie)."""
    n = canvas // align
    cells = [(-(-w // align), -(-h // align), -(-(w + gap) // align), -(-(h + gap) // align)) for w, h in sizes]
    orders = ((lambda i: (-cells[i][0] * cells[i][1], -cells[i][1])), (lambda i: (-cells[i][1], -cells[i][0])),
              (lambda i: (-cells[i][0], -cells[i][1])))
    extra = max(max(c[2] - c[0], c[3] - c[1]) for c in cells)
    best: tuple[list[Placement], int] = ([], 0)
    for k, key in enumerate(orders):
        grids: list[np.ndarray] = []
        placed: list[Placement] = []
        for i in sorted(range(len(sizes)), key=key):
            cw, ch, gw, gh = cells[i]
            c = 0
            while True:
                if c == len(grids):
                    grids.append(np.zeros((n + extra, n + extra), np.int32))
                occ = grids[c]
                spot = next(((y, x) for y in range(n - ch + 1) for x in range(n - cw + 1)
                             if not occ[y : y + gh, x : x + gw].any()), None)
                if spot is not None:
                    y, x = spot
                    occ[y : y + gh, x : x + gw] = 1
                    placed.append(Placement(i, c, x * align, y * align))
                    break
                c += 1
        placed.sort(key=lambda p: p.index)
        if k == 0 or len(grids) < best[1]:
            best = (placed, len(grids))
        if len(sizes) <= 1:
            break
    return best


@pytest.mark.parametrize(("canvas", "align", "gap"), [(640, 32, 0), (640, 32, 20), (640, 32, 40), (320, 16, 8),
                                                      (128, 32, 33)])
def test_bitboard_packing_is_the_first_fit(canvas: int, align: int, gap: int) -> None:
    """Gaps that run off the right and bottom edges, boxes up to the whole canvas, shapes repeated (the per-shape
    first-canvas shortcut), several canvases: the same placements as the definition."""
    rng = np.random.default_rng(canvas + gap)
    for trial in range(12):
        count = int(rng.integers(1, 70))
        if trial % 3 == 0:
            sizes = [(int(rng.integers(1, canvas + 1)), int(rng.integers(1, canvas + 1))) for _ in range(count)]
        else:
            shapes = [(int(rng.integers(1, 6)) * align, int(rng.integers(1, 6)) * align) for _ in range(4)]
            sizes = [shapes[int(rng.integers(0, 4))] for _ in range(count)]
        sizes = [(min(w, canvas), min(h, canvas)) for w, h in sizes]
        got = pack(sizes, canvas, gap=gap, align=align)
        assert got == _definition(sizes, canvas, gap, align), (trial, sizes)


@pytest.mark.parametrize("align", [1, 32])
def test_positions_are_the_placements(align: int) -> None:
    rng = np.random.default_rng(align)
    sizes = [(int(rng.integers(1, 300)), int(rng.integers(1, 300))) for _ in range(40)]
    placed, count = pack(sizes, 640, gap=4, align=align)
    assert pack_positions(sizes, 640, gap=4, align=align) == ([(p.canvas, p.x, p.y) for p in placed], count)
    assert pack_positions([], 640, align=align) == ([], 0)


def test_grid_packing_refuses_a_negative_gap_and_a_box_too_big() -> None:
    with pytest.raises(ValueError, match="gap must be >= 0"):
        pack([(32, 32)], 640, gap=-1, align=32)
    with pytest.raises(ValueError, match="does not fit"):
        pack([(641, 32)], 640, align=32)


LB = Letterbox(src_w=768, src_h=576, scale=640 / 768, pad_x=0.0, pad_y=80.0)


def _row(k: int, camera: str, verdict: Verdict) -> DecodedRow:
    return DecodedRow(Frame(camera, k, 0.0, 0.0, jpeg=b"j" * (100 + k)), LB, 768, 576, verdict, k)


def test_layout_puts_full_rows_then_canvases_then_features_rows() -> None:
    """FULL rows in frame order, the REGIONS crops on canvases after them, features-mode frames last; each
    frame's item says where its pixels went and what share of its content was inferred."""
    full = Verdict(Decision.FULL, "keyframe")
    regions = Verdict(Decision.REGIONS, "change", (Rect(64, 96, 160, 224), Rect(0, 96, 32, 128)))
    skip = Verdict(Decision.SKIP, "no change")
    rows = [_row(0, "a", regions), _row(1, "b", full), _row(2, "feat", full), _row(3, "c", skip),
            _row(4, "feat", regions), _row(5, "d", full)]
    lay = lay_out(rows, 640, 8, None, lambda cam: cam == "feat", 0.5)
    assert (lay.n_full, lay.canvases, lay.feature_rows) == (2, 1, 2)
    assert lay.copies == [(1, 0), (2, 3), (4, 4), (5, 1)]
    assert lay.crops == [(0, 96, 64, 128, 96, 2, 0, 0), (0, 96, 0, 32, 32, 2, 0, 96)]
    slots = [it.slot for it in lay.items]
    assert slots == [-1, 0, 3, -1, 4, 1]
    assert [it.features for it in lay.items] == [False, False, True, False, True, False]
    assert [(p.slot, p.x, p.y, p.region) for p in lay.items[0].placements] == [
        (2, 0, 0, Rect(64, 96, 160, 224)), (2, 96, 0, Rect(0, 96, 32, 128))]
    share = (96 * 128 + 32 * 32) / content_rect(LB).area
    assert [it.inferred_fraction for it in lay.items] == [share, 1.0, 1.0, 0.0, share, 1.0]
    assert [it.bytes_h2d for it in lay.items] == [100 + k for k in range(6)]
    assert all(it.decode_s == 0.5 and it.bytes_decoded == 768 * 576 * 3 for it in lay.items)


def test_layout_without_canvas_room_sends_the_largest_regions_frame_full() -> None:
    big = Verdict(Decision.REGIONS, "change", (Rect(0, 0, 640, 640), Rect(0, 0, 640, 608)))  # two canvases
    small = Verdict(Decision.REGIONS, "change", (Rect(0, 0, 64, 64),))
    rows = [_row(0, "a", small), _row(1, "b", big)]
    lay = lay_out(rows, 640, 2, None, None, 0.0)
    assert (lay.n_full, lay.canvases) == (1, 1)
    assert rows[1].verdict.decision is Decision.FULL and lay.items[1].slot == 0
    assert lay.copies == [(1, 0)] and lay.crops == [(0, 0, 0, 64, 64, 1, 0, 0)]
