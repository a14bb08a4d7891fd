"""Tile change maps: signature vs reference, brightness shifts discounted, against an adaptive noise floor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class ChangeMap:
    changed: NDArray[np.bool_]  # (tiles_y, tiles_x)
    score: NDArray[np.float32]  # mean abs luma difference per tile after brightness compensation
    brightness_shift: float  # median signature difference (global lighting change)
    threshold: float  # the per-tile threshold that was applied

    @property
    def changed_fraction(self) -> float:
        return float(self.changed.mean()) if self.changed.size else 0.0


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
            self.value = (1 - self.alpha) * self.value + self.alpha * float(np.median(unchanged_scores))


def change_map(sig: NDArray[np.uint8], ref: NDArray[np.uint8], cells_per_tile: int, noise: NoiseFloor) -> ChangeMap:
    scores, shift = tile_scores(sig, ref, cells_per_tile)
    return change_map_of(scores, shift, noise)


def change_map_of(scores: NDArray[np.float32], shift: float, noise: NoiseFloor) -> ChangeMap:
    """The change map of tile scores computed elsewhere (the GPU path scores a whole batch on the device)."""
    thr = noise.threshold()
    changed = scores > thr
    noise.update(scores[~changed])
    return ChangeMap(changed, scores, shift, thr)
