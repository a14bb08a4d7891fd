"""`delta.mode: features` on the CPU: keep each camera's backbone feature maps, recompute them only on the
changed regions (plus a halo), splice the result in, and run the head on the whole spliced maps.

The head's output has the full model's layout, so :func:`daemon.inference.yolo.decode_output` reads it
unchanged.

The halo is the context a crop gets around its region. Measured on vtest with YOLOv8n at the ``local`` cut
(largest error of a region's cells vs the full frame's, relative to the map's peak): with 64 px, stride 8 is
exact, stride 16 within 0.8 %, stride 32 within 8 %; with (64, 96, 128) px all three are within 0.3 %. Over all
795 vtest frames 64 px gave mAP50 0.978 at 88 % of the full model's convolution work, (64, 96, 128) px gave 0.985
at 94 %. The reference maps are the state that is stored and moved between GPUs, so the default keeps them
within 0.3 % of a full run: (64, 96, 128).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.delta.policy import Rect
from daemon.features.cache import Crop, FeatureMaps, plan_crops, splice
from daemon.features.split import SplitModel
from daemon.inference.onnxrt import import_onnxruntime

log = logging.getLogger(__name__)

DEFAULT_HALOS = (64, 96, 128)  # context pixels per tap, finest stride first (YOLOv8n, local cut)
DEFAULT_WHOLE_FRACTION = 0.8  # crops covering this share of the input: run the backbone on the whole input


@dataclass(frozen=True, slots=True)
class SpliceResult:
    """What one REGIONS frame cost in ``features`` mode."""

    raw: NDArray[np.float32]  # head output, (1, ...) in the full model's layout
    crops: tuple[Crop, ...]
    crop_pixels: int  # input pixels the backbone ran on
    cells: int  # feature cells pasted, all strides
    backbone_s: float
    head_s: float


def make_quiet_session(onnx_bytes: bytes, threads: int = 0,
                       providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime session like :func:`daemon.inference.onnxrt.make_session` but with intra-op spinning off.

    Each session owns a thread pool whose threads spin after a run; with two or three sessions taking turns on
    few cores (backbone, head, full model) the idle pools' spinning starves the running one. Measured on this
    2-core machine: full model 410 ms, head 314 ms with spinning; 52 ms and 31 ms without.
    """
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=list(providers))


def halos_for(halo: int | Sequence[int], taps: int) -> tuple[int, ...]:
    """One halo for every tap, or one per tap (finest stride first)."""
    if isinstance(halo, int):
        return (halo,) * taps
    out = tuple(int(h) for h in halo)
    if len(out) != taps:
        raise ValueError(f"halo needs 1 or {taps} values (one per stride), got {out}")
    return out


class FeatureDeltaRunner:
    """Runs a :class:`SplitModel`: full frames (backbone + head) and REGIONS frames (backbone on crops, head on
    the spliced reference maps). Both halves run with onnxruntime on the CPU by default. When the crops of a
    frame add up to ``whole_fraction`` of the input, the backbone runs once on the whole input instead (exact,
    and cheaper than many overlapping crops)."""

    def __init__(self, split: SplitModel, halo: int | Sequence[int] = DEFAULT_HALOS, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 whole_fraction: float = DEFAULT_WHOLE_FRACTION) -> None:
        if not 0.0 < whole_fraction <= 1.0:
            raise ValueError(f"whole_fraction must be in (0, 1], got {whole_fraction}")
        self.split = split
        self.whole_fraction = whole_fraction
        self.strides = tuple(t.stride for t in split.taps)
        self.halos = halos_for(halo, len(split.taps))
        self.input_hw = split.model.input_hw
        self._names = [t.name for t in split.taps]
        self._input = split.model.input_name
        self._output = split.model.output_name
        self._backbone = make_quiet_session(split.backbone_bytes, threads, providers)
        self._head = make_quiet_session(split.head_bytes, threads, providers)

    # -- the halves -------------------------------------------------------------------------------------------
    def backbone(self, images: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """(B, 3, h, w) -> one (B, C, h/s, w/s) array per tap; h and w multiples of the largest stride."""
        top = max(self.strides)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % top or images.shape[3] % top:
            raise ValueError(f"backbone input must be (B, 3, h, w) with h, w multiples of {top}, got {images.shape}")
        out: list[NDArray[np.float32]] = self._backbone.run(self._names, {self._input: np.ascontiguousarray(images)})
        return out

    def head(self, maps: Sequence[NDArray[np.float32]]) -> NDArray[np.float32]:
        """One (B, C, H/s, W/s) array per tap -> the model's raw output (B, ...)."""
        feed = {n: np.ascontiguousarray(m) for n, m in zip(self._names, maps, strict=True)}
        out: NDArray[np.float32] = self._head.run([self._output], feed)[0]
        return out

    # -- frames -----------------------------------------------------------------------------------------------
    def full(self, images: NDArray[np.float32]) -> tuple[NDArray[np.float32], list[FeatureMaps]]:
        """(B, 3, H, W) full frames -> (raw output, each image's feature maps as (C, H/s, W/s) copies)."""
        maps = self.backbone(images)
        raw = self.head(maps)
        return raw, [[np.array(m[b]) for m in maps] for b in range(images.shape[0])]

    def regions(self, image: NDArray[np.float32], ref_maps: FeatureMaps, regions: Sequence[Rect]) -> SpliceResult:
        """Recompute the backbone on ``regions`` (model-input pixels) of ``image`` (3, H, W) plus the halo,
        splice the crops' interiors into ``ref_maps`` (in place: they become this frame's maps) and run the
        head on them."""
        if image.shape != (3, *self.input_hw):
            raise ValueError(f"image must be (3, {self.input_hw[0]}, {self.input_hw[1]}), got {image.shape}")
        self._check_maps(ref_maps)
        crops = plan_crops(regions, self.halos, self.strides, self.input_hw)
        h, w = self.input_hw
        t0 = time.perf_counter()
        if sum(c.box.area for c in crops) >= self.whole_fraction * h * w:
            # one exact run over the whole input is cheaper; still paste only the regions' cells
            whole = Rect(0, 0, w, h)
            crops = tuple(Crop(whole, c.pastes) for c in crops)
            maps = [m[0] for m in self.backbone(image[None])]
            crop_maps = [maps] * len(crops)
            pixels = h * w
        else:
            crop_maps = self._run_crops(image, crops)
            pixels = sum(c.box.area for c in crops)
        cells = splice(ref_maps, crop_maps, crops, self.strides)
        t1 = time.perf_counter()
        raw = self.head([m[None] for m in ref_maps])
        return SpliceResult(raw, crops, pixels, cells, t1 - t0, time.perf_counter() - t1)

    def work_fraction(self, crop_pixels: int) -> float:
        """Convolution work of a REGIONS frame whose crops cover ``crop_pixels``, as a share of a full frame."""
        h, w = self.input_hw
        total = self.split.backbone_macs + self.split.head_macs
        if not total:
            return 1.0
        return (self.split.backbone_macs * min(1.0, crop_pixels / (h * w)) + self.split.head_macs) / total

    def _run_crops(self, image: NDArray[np.float32], crops: Sequence[Crop]) -> list[FeatureMaps]:
        """Backbone on every crop; crops of one size run as one batch."""
        out: list[FeatureMaps | None] = [None] * len(crops)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, c in enumerate(crops):
            by_size.setdefault((c.height, c.width), []).append(k)
        for idx in by_size.values():
            batch = np.stack([image[:, crops[k].box.y1 : crops[k].box.y2, crops[k].box.x1 : crops[k].box.x2]
                              for k in idx])
            maps = self.backbone(batch)
            for j, k in enumerate(idx):
                out[k] = [m[j] for m in maps]
        return [m for m in out if m is not None]

    def _check_maps(self, maps: FeatureMaps) -> None:
        want = [(t.channels, t.height, t.width) for t in self.split.taps]
        got = [tuple(m.shape) for m in maps]
        if got != want:
            raise ValueError(f"reference maps must have shapes {want}, got {got}")
