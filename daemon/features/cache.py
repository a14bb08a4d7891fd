"""Reference feature maps per camera, and how region crops are planned and spliced into them.

A REGIONS frame recomputes the backbone only on crops: each changed region (model-input pixels, from the level-1
policy) is aligned outward to the largest stride and grown by a halo of context. The backbone's cells near a
crop edge see zero padding instead of the real neighbours, so only the crop's interior is pasted: at each stride
the crop shrunk by that stride's halo (sides on the image border are exact and are not shrunk). Crop origins are
multiples of the largest stride, so the crop's cell grid lines up with the full map's at every stride.

Arrays are numpy on the CPU path and CuPy on the GPU path; the functions only slice and assign, so one
implementation serves both.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.delta.policy import Rect

FeatureMaps = list[Any]  # one (C, H, W) array per tap, finest stride first (numpy or CuPy)


@dataclass(frozen=True, slots=True)
class Crop:
    """One backbone run: ``box`` is the input area (model-input pixels); ``pastes[i]`` the part of it whose
    cells are pasted at tap ``i`` (model-input pixels, multiples of that tap's stride)."""

    box: Rect
    pastes: tuple[Rect, ...]

    @property
    def width(self) -> int:
        return self.box.x2 - self.box.x1

    @property
    def height(self) -> int:
        return self.box.y2 - self.box.y1


def _floor(v: int, a: int) -> int:
    return (v // a) * a


def _ceil(v: int, a: int) -> int:
    return -(-v // a) * a


def align_out(r: Rect, align: int, width: int, height: int) -> Rect:
    """``r`` grown to multiples of ``align`` and clipped to the input."""
    return Rect(max(0, _floor(r.x1, align)), max(0, _floor(r.y1, align)),
                min(width, _ceil(r.x2, align)), min(height, _ceil(r.y2, align)))


def grow(r: Rect, by: int, width: int, height: int) -> Rect:
    return Rect(max(0, r.x1 - by), max(0, r.y1 - by), min(width, r.x2 + by), min(height, r.y2 + by))


def _union(a: Rect, b: Rect) -> Rect:
    return Rect(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2))


def _overlap(a: Rect, b: Rect) -> bool:
    return a.x1 < b.x2 and b.x1 < a.x2 and a.y1 < b.y2 and b.y1 < a.y2


def _merge(boxes: list[Rect]) -> list[Rect]:
    """Replace overlapping boxes by their union while that costs no more pixels than running both."""
    boxes = list(boxes)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                u = _union(a, b)
                if _overlap(a, b) and u.area <= a.area + b.area:
                    boxes[i] = u
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def shrink(box: Rect, by: int, stride: int, width: int, height: int) -> Rect:
    """``box`` shrunk by ``by`` pixels on the sides inside the image, rounded inward to ``stride``."""
    x1 = box.x1 if box.x1 == 0 else _ceil(box.x1 + by, stride)
    y1 = box.y1 if box.y1 == 0 else _ceil(box.y1 + by, stride)
    x2 = box.x2 if box.x2 == width else _floor(box.x2 - by, stride)
    y2 = box.y2 if box.y2 == height else _floor(box.y2 - by, stride)
    return Rect(x1, y1, max(x1, x2), max(y1, y2))


def plan_crops(regions: Sequence[Rect], halos: Sequence[int], strides: Sequence[int],
               input_hw: tuple[int, int]) -> tuple[Crop, ...]:
    """The backbone crops for ``regions``: per region the region aligned to the largest stride and grown by
    the largest halo; overlapping crops merge when that is no dearer. ``halos[i]`` is the context tap ``i``
    needs (pixels)."""
    if len(halos) != len(strides):
        raise ValueError(f"{len(halos)} halos for {len(strides)} strides")
    if any(h < 0 for h in halos):
        raise ValueError(f"halos must be >= 0, got {tuple(halos)}")
    height, width = input_hw
    align = max(strides)
    boxes = [align_out(grow(align_out(r, align, width, height), _ceil(max(halos), align), width, height),
                       align, width, height) for r in regions if r.area > 0]
    return tuple(
        Crop(b, tuple(shrink(b, h, s, width, height) for h, s in zip(halos, strides, strict=True)))
        for b in _merge(boxes)
    )


def splice(ref_maps: FeatureMaps, crop_maps: Sequence[FeatureMaps], crops: Sequence[Crop],
           strides: Sequence[int]) -> int:
    """Paste each crop's interior cells into ``ref_maps`` (in place), at each stride; returns the cells pasted.

    ``crop_maps[k][i]`` is the backbone's tap ``i`` for ``crops[k]``, shape (C, crop_h / stride, crop_w / stride).
    """
    if len(crop_maps) != len(crops):
        raise ValueError(f"{len(crop_maps)} crop outputs for {len(crops)} crops")
    cells = 0
    for maps, crop in zip(crop_maps, crops, strict=True):
        for i, stride in enumerate(strides):
            p, b = crop.pastes[i], crop.box
            if p.area == 0:
                continue
            ys, xs = slice(p.y1 // stride, p.y2 // stride), slice(p.x1 // stride, p.x2 // stride)
            cy = slice((p.y1 - b.y1) // stride, (p.y2 - b.y1) // stride)
            cx = slice((p.x1 - b.x1) // stride, (p.x2 - b.x1) // stride)
            ref_maps[i][:, ys, xs] = maps[i][:, cy, cx]
            cells += (ys.stop - ys.start) * (xs.stop - xs.start)
    return cells


class FeatureCache:
    """Per-camera reference feature maps (host memory on the CPU path, device memory on the GPU path)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, FeatureMaps] = {}

    def get(self, camera: str) -> FeatureMaps | None:
        with self._lock:
            return self._maps.get(camera)

    def put(self, camera: str, maps: FeatureMaps) -> None:
        with self._lock:
            self._maps[camera] = maps

    def copy(self, camera: str) -> FeatureMaps | None:
        """Copies of the camera's maps, complete when this returns (device maps: copied on the calling thread's
        stream, which is then waited for, so nothing can reuse the originals' memory under the copy)."""
        with self._lock:
            maps = self._maps.get(camera)
        if maps is None:
            return None
        out = [m.copy() for m in maps]
        if out and hasattr(out[0], "__cuda_array_interface__"):
            import cupy

            cupy.cuda.get_current_stream().synchronize()
        return out

    def drop(self, camera: str) -> bool:
        with self._lock:
            return self._maps.pop(camera, None) is not None

    def cameras(self) -> list[str]:
        with self._lock:
            return list(self._maps)

    def nbytes(self) -> int:
        """Reference memory held, all cameras."""
        with self._lock:
            return sum(int(a.nbytes) for maps in self._maps.values() for a in maps)
