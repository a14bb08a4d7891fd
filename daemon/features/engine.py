"""`delta.mode: features`: keep each camera's backbone feature maps, recompute them only on the
changed regions (plus a halo), splice the result in, and run the head on the whole spliced maps.

The head's output has the full model's layout, so :func:`daemon.inference.yolo.decode_output` (or the GPU
post-processing) reads it unchanged. Planning, cropping and splicing here are the same code for numpy and CuPy;
where the two halves run is a :class:`Halves` (onnxruntime on the CPU here, the CUDA EP in daemon.features.gpu).

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
from typing import Any, Protocol

import numpy as np

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

    raw: Any  # head output, (1, ...) float32 in the full model's layout (numpy, or CuPy on the GPU)
    crops: tuple[Crop, ...]
    crop_pixels: int  # input pixels the backbone ran on
    cells: int  # feature cells pasted, all strides
    backbone_s: float
    head_s: float


@dataclass(frozen=True, slots=True)
class Spliced:
    """What recomputing a REGIONS frame's backbone and splicing it cost (the head not included)."""

    crops: tuple[Crop, ...]
    crop_pixels: int
    cells: int
    backbone_s: float


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


class Halves(Protocol):
    """Where the two sub-models run: ``xp`` is their array module (numpy, or CuPy on the GPU) and ``map_dtype``
    the dtype of the feature maps the backbone produces."""

    xp: Any
    map_dtype: Any

    def backbone(self, images: Any) -> list[Any]: ...  # (B, 3, h, w) -> one (B, C, h/s, w/s) array per tap

    def head(self, maps: Sequence[Any]) -> Any: ...  # one (B, C, H/s, W/s) array per tap -> (B, ...) float32


class CpuHalves:
    """Both halves with onnxruntime on host arrays (the CPU path)."""

    xp: Any = np
    map_dtype: Any = np.float32

    def __init__(self, split: SplitModel, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self._names = [t.name for t in split.taps]
        self._input = split.model.input_name
        self._output = split.model.output_name
        self._backbone = make_quiet_session(split.backbone_bytes, threads, providers)
        self._head = make_quiet_session(split.head_bytes, threads, providers)

    def backbone(self, images: Any) -> list[Any]:
        out: list[Any] = self._backbone.run(self._names, {self._input: np.ascontiguousarray(images, np.float32)})
        return out

    def head(self, maps: Sequence[Any]) -> Any:
        feed = {n: np.ascontiguousarray(m, np.float32) for n, m in zip(self._names, maps, strict=True)}
        return np.asarray(self._head.run([self._output], feed)[0], np.float32)


def bucket_crops(crops: Sequence[Crop], bucket: int, input_hw: tuple[int, int], align: int) -> tuple[Crop, ...]:
    """Each crop's box grown (right/down, or left/up at the input's edge) to a multiple of ``bucket`` pixels per
    side, so the backbone sees few distinct input shapes (the GPU path: a new shape costs the CUDA EP a
    re-plan of every convolution). The pastes stay as planned: they only gain context."""
    if bucket <= 0:
        return tuple(crops)
    if bucket % align:
        raise ValueError(f"bucket {bucket} must be a multiple of the largest stride {align}")
    h, w = input_hw
    out = []
    for c in crops:
        b = c.box
        bw, bh = min(w, -(-(b.x2 - b.x1) // bucket) * bucket), min(h, -(-(b.y2 - b.y1) // bucket) * bucket)
        x1, y1 = min(b.x1, w - bw), min(b.y1, h - bh)
        out.append(Crop(Rect(x1, y1, x1 + bw, y1 + bh), c.pastes))
    return tuple(out)


class FeatureDeltaRunner:
    """Runs a :class:`SplitModel`: full frames (backbone + head) and REGIONS frames (backbone on crops, head on
    the spliced reference maps). Both halves run with onnxruntime on the CPU by default; ``halves`` puts them
    elsewhere (daemon.features.gpu: the CUDA EP on device arrays), the planning and splicing here are the same
    code for numpy and CuPy. When the crops of a frame add up to ``whole_fraction`` of the input, the backbone
    runs once on the whole input instead (exact, and cheaper than many overlapping crops). ``bucket`` > 0 grows
    every crop to a multiple of that many pixels per side (:func:`bucket_crops`)."""

    def __init__(self, split: SplitModel, halo: int | Sequence[int] = DEFAULT_HALOS, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 whole_fraction: float = DEFAULT_WHOLE_FRACTION, halves: Halves | None = None,
                 bucket: int = 0) -> None:
        if not 0.0 < whole_fraction <= 1.0:
            raise ValueError(f"whole_fraction must be in (0, 1], got {whole_fraction}")
        self.split = split
        self.whole_fraction = whole_fraction
        self.strides = tuple(t.stride for t in split.taps)
        self.halos = halos_for(halo, len(split.taps))
        self.input_hw = split.model.input_hw
        if bucket and bucket % max(self.strides):
            raise ValueError(f"bucket {bucket} must be a multiple of the largest stride {max(self.strides)}")
        self.bucket = bucket
        self._halves: Halves = halves if halves is not None else CpuHalves(split, threads, providers)
        self.xp: Any = self._halves.xp
        self.map_dtype: Any = self._halves.map_dtype

    # -- the halves -------------------------------------------------------------------------------------------
    def backbone(self, images: Any) -> list[Any]:
        """(B, 3, h, w) -> one (B, C, h/s, w/s) array per tap; h and w multiples of the largest stride."""
        top = max(self.strides)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % top or images.shape[3] % top:
            raise ValueError(f"backbone input must be (B, 3, h, w) with h, w multiples of {top}, got {images.shape}")
        return self._halves.backbone(images)

    def head(self, maps: Sequence[Any]) -> Any:
        """One (B, C, H/s, W/s) array per tap -> the model's raw output (B, ...) in float32."""
        return self._halves.head(maps)

    # -- frames -----------------------------------------------------------------------------------------------
    def features(self, images: Any) -> list[FeatureMaps]:
        """(B, 3, H, W) full frames -> each image's feature maps, (C, H/s, W/s) arrays of its own."""
        maps = self.backbone(images)
        return [[m[b].copy() for m in maps] for b in range(int(images.shape[0]))]

    def full(self, images: Any) -> tuple[Any, list[FeatureMaps]]:
        """(B, 3, H, W) full frames -> (raw output, each image's feature maps as (C, H/s, W/s) copies)."""
        maps = self.backbone(images)
        raw = self.head(maps)
        return raw, [[m[b].copy() for m in maps] for b in range(int(images.shape[0]))]

    def adopt(self, maps: FeatureMaps | None) -> FeatureMaps | None:
        """A writable copy of ``maps`` (numpy or CuPy, any float dtype: an imported state) where this runner
        computes, in its map dtype; None when there are none or their shapes are not this split's."""
        if maps is None:
            return None
        want = [(t.channels, t.height, t.width) for t in self.split.taps]
        if [tuple(int(v) for v in m.shape) for m in maps] != want:
            log.warning("reference feature maps of shapes %s do not fit this split (%s): recomputed",
                        [tuple(m.shape) for m in maps], want)
            return None
        xp = self.xp
        if xp is np:
            return [np.array(_host(m), dtype=self.map_dtype) for m in maps]
        return [xp.array(m, dtype=self.map_dtype) for m in maps]

    def recompute(self, image: Any, ref_maps: FeatureMaps, regions: Sequence[Rect]) -> Spliced:
        """Recompute the backbone on ``regions`` (model-input pixels) of ``image`` (3, H, W) plus the halo and
        splice the crops' interiors into ``ref_maps`` (in place: they become this frame's maps)."""
        if tuple(image.shape) != (3, *self.input_hw):
            raise ValueError(f"image must be (3, {self.input_hw[0]}, {self.input_hw[1]}), got {image.shape}")
        self._check_maps(ref_maps)
        crops = plan_crops(regions, self.halos, self.strides, self.input_hw)
        crops = bucket_crops(crops, self.bucket, self.input_hw, max(self.strides))
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
        return Spliced(crops, pixels, cells, time.perf_counter() - t0)

    def regions(self, image: Any, ref_maps: FeatureMaps, regions: Sequence[Rect]) -> SpliceResult:
        """:meth:`recompute`, then the head on the spliced maps."""
        s = self.recompute(image, ref_maps, regions)
        t1 = time.perf_counter()
        raw = self.head([m[None] for m in ref_maps])
        return SpliceResult(raw, s.crops, s.crop_pixels, s.cells, s.backbone_s, time.perf_counter() - t1)

    def work_fraction(self, crop_pixels: int) -> float:
        """Convolution work of a REGIONS frame whose crops cover ``crop_pixels``, as a share of a full frame."""
        h, w = self.input_hw
        total = self.split.backbone_macs + self.split.head_macs
        if not total:
            return 1.0
        return (self.split.backbone_macs * min(1.0, crop_pixels / (h * w)) + self.split.head_macs) / total

    def _run_crops(self, image: Any, crops: Sequence[Crop]) -> list[FeatureMaps]:
        """Backbone on every crop; crops of one size run as one batch."""
        out: list[FeatureMaps | None] = [None] * len(crops)
        by_size: dict[tuple[int, int], list[int]] = {}
        for k, c in enumerate(crops):
            by_size.setdefault((c.height, c.width), []).append(k)
        for idx in by_size.values():
            batch = self.xp.stack([image[:, crops[k].box.y1 : crops[k].box.y2, crops[k].box.x1 : crops[k].box.x2]
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


def _host(a: Any) -> Any:
    """numpy arrays as they are; device arrays copied to the host."""
    return a.get() if hasattr(a, "__cuda_array_interface__") else a
