"""Tile change maps: signature vs reference, brightness shifts discounted, against an adaptive noise floor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class ChangeMap:
    changed: NDArray[np.bool_]  # (tiles_y, tiles_x)
    score: NDArray[np.float32]  # mean abs luma difference per tile after brightness compensation
    brightness_shift: float  # median signature difference (global lighting change)
    threshold: float  # the per-tile threshold that was applied
    n_changed: int = -1  # changed tiles (counted here when not given)

    def __post_init__(self) -> None:
        if self.n_changed < 0:
            object.__setattr__(self, "n_changed", int(np.count_nonzero(self.changed)))

    @property
    def changed_fraction(self) -> float:
        # == float(changed.mean()): a count over a size, one correctly rounded float64 division either way
        return self.n_changed / self.changed.size if self.changed.size else 0.0


def tile_scores(
    sig: NDArray[np.uint8], ref: NDArray[np.uint8], cells_per_tile: int
) -> tuple[NDArray[np.float32], float]:
    """Mean |sig - ref - median shift| per tile of ``cells_per_tile`` x ``cells_per_tile`` signature cells."""
    if sig.shape != ref.shape:
        raise ValueError(f"signature shape {sig.shape} differs from reference {ref.shape}")
    diff = sig.astype(np.int16) - ref.astype(np.int16)
    shift = float(np.median(diff))
    adiff = np.abs(diff.astype(np.float32) - shift)
    ty, tx = sig.shape[0] // cells_per_tile, sig.shape[1] // cells_per_tile
    tiles = adiff[: ty * cells_per_tile, : tx * cells_per_tile].reshape(ty, cells_per_tile, tx, cells_per_tile)
    return tiles.mean(axis=(1, 3)).astype(np.float32), shift


@dataclass(slots=True)
class NoiseFloor:
    """Per-camera running estimate of the tile score of an unchanged scene (sensor noise, compression)."""

    value: float = 2.0
    alpha: float = 0.05
    k: float = 3.0
    min_threshold: float = 6.0

    def threshold(self) -> float:
        return max(self.min_threshold, self.k * self.value)

    def update(self, unchanged_scores: NDArray[np.float32]) -> None:
        if unchanged_scores.size:
            self.blend(median(unchanged_scores))

    def blend(self, unchanged_median: float) -> None:
        """``update`` with the unchanged tiles' median already taken."""
        self.value = (1 - self.alpha) * self.value + self.alpha * unchanged_median


def median(a: NDArray[np.floating[Any]], smallest: int | None = None) -> float:
    """``float(np.median(a))`` for a float array, without np.median's layers of wrapping: the same partition, the
    same NaN rule, the mean of the two middle values in the array's own precision (as np.mean takes it).

    ``smallest``: the median of the ``smallest`` lowest values instead, NaN if ``a`` holds NaN (the median of the
    unchanged tiles: ``a[~(a > thr)]``, the ``smallest`` values not above ``thr``, NaN included, without the copy)."""
    flat = a.ravel()
    n = flat.size
    m = n if smallest is None else smallest
    if n == 0 or m <= 0 or m > n or a.dtype.kind != "f":
        if smallest is not None:
            raise ValueError(f"median of the {smallest} smallest of {n} values")
        return float(np.median(a))
    k = m // 2
    if m % 2:
        p = np.partition(flat, (k, n - 1))
        med = p[k]
    else:
        p = np.partition(flat, (k - 1, k, n - 1))
        med = (p[k - 1] + p[k]) / 2  # numpy scalars of a's dtype: halving is exact
    return math.nan if math.isnan(p[n - 1]) else float(med)


def change_map(sig: NDArray[np.uint8], ref: NDArray[np.uint8], cells_per_tile: int, noise: NoiseFloor) -> ChangeMap:
    scores, shift = tile_scores(sig, ref, cells_per_tile)
    return change_map_of(scores, shift, noise)


def change_map_of(scores: NDArray[np.float32], shift: float, noise: NoiseFloor) -> ChangeMap:
    """The change map of tile scores computed elsewhere (the GPU path scores a whole batch on the device)."""
    thr = noise.threshold()
    changed = scores > thr
    n_changed = int(np.count_nonzero(changed))
    if n_changed < scores.size:  # the unchanged scores are the smallest ones (NaN counts as unchanged)
        noise.blend(median(scores, scores.size - n_changed))
    return ChangeMap(changed, scores, shift, thr, n_changed)


def change_maps_of(scores: NDArray[np.float32], shifts: Sequence[float],
                   noises: Sequence[NoiseFloor]) -> list[ChangeMap]:
    """``change_map_of`` for n frames of different cameras at once: ``scores`` (n, ty, tx) float32 stacked, each
    frame against its own noise floor. The thresholds are compared in float32 as ``scores > thr`` does with a
    Python float, the counts taken in one call; each floor then blends its own unchanged tiles' median."""
    n = scores.shape[0]
    thr = [nf.threshold() for nf in noises]
    changed = scores > np.asarray(thr, np.float32).reshape(n, 1, 1)
    counts = np.count_nonzero(changed.reshape(n, -1), axis=1).tolist()
    size = scores[0].size if n else 0
    srt = np.sort(scores.reshape(n, size), axis=1) if n and min(counts) < size else None  # one sort, not n partitions
    out = []
    for k in range(n):
        c = counts[k]
        if srt is not None and c < size:  # median(scores[k], size - c): the same order statistics of the same values
            row = srt[k]
            m = size - c
            h = m // 2
            med = row[h] if m % 2 else (row[h - 1] + row[h]) / 2  # float32 scalars, as median() takes them
            noises[k].blend(math.nan if math.isnan(row[size - 1]) else float(med))
        out.append(ChangeMap(changed[k], scores[k], float(shifts[k]), thr[k], c))
    return out
