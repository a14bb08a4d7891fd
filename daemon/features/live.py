"""`delta.mode: features` in the live pipeline (CPU and GPU paths): the inference stage hands the rows of
features-mode cameras to this stage instead of the engine. A FULL frame runs backbone + head and its backbone maps
become the camera's reference features; a REGIONS frame recomputes the backbone on its regions (plus halo), splices them
into the reference maps and runs the head on the whole spliced maps, so its detections cover the whole frame.

The reference maps are kept in the runtime's FeatureCache (host memory on the CPU path, device memory on the GPU
path: daemon.features.gpu), which is also what `Runtime.export_camera` moves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.delta.policy import Decision
from daemon.features.cache import FeatureCache, FeatureMaps
from daemon.features.codec import DEFAULT_THRESHOLD, FeatureDeltaEncoder
from daemon.features.engine import FeatureDeltaRunner
from daemon.inference.model import LoadedModel
from daemon.pipeline.prepare import Prepared

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeatureRows:
    raw: Any  # (k, ...) float32 raw outputs in the full model's layout, one per features row (numpy or CuPy)
    work: tuple[float, ...]  # per row: its convolution work as a share of a full frame's


class FeatureStage:
    """The rows of features-mode cameras: per row the backbone (whole frame, or the regions' crops spliced
    into the camera's reference maps), then the head once on all rows' maps. The runner's halves decide where
    this runs (host arrays on the CPU path, device arrays on the GPU path); the code here is the same.

    A reference is never written in place: a REGIONS frame splices into a copy, which then replaces the
    camera's reference, so maps handed out (an export, the previous frame's head input) never change."""

    def __init__(self, runner: FeatureDeltaRunner, cache: FeatureCache) -> None:
        self._runner = runner
        self.cache = cache
        self._cameras: frozenset[str] = frozenset()
        self._streams: frozenset[str] = frozenset()
        self._encoders: dict[str, FeatureDeltaEncoder] = {}
        self._bytes: dict[str, tuple[int, int]] = {}  # camera -> (codec bytes, full FP32 map bytes), cumulative
        self._lock = threading.Lock()
        self.rows = 0  # features rows inferred, and the time they took (bench, tests)
        self.busy_s = 0.0

    @staticmethod
    def build(model: LoadedModel, cache: FeatureCache, threads: int = 0) -> FeatureStage:
        from daemon.features.split import split_model

        return FeatureStage(FeatureDeltaRunner(split_model(model), threads=threads), cache)

    @property
    def runner(self) -> FeatureDeltaRunner:
        return self._runner

    def set_cameras(self, cameras: Sequence[str], streams: Sequence[str] = ()) -> None:
        """The cameras in features mode now (config reloads), and those of them whose map changes are encoded
        (delta.feature_stream); the others' reference maps and encoders are dropped."""
        with self._lock:
            self._cameras = frozenset(cameras)
            self._streams = frozenset(streams) & self._cameras
            for cam in list(self._encoders):
                if cam not in self._streams:
                    del self._encoders[cam]
        for cam in self.cache.cameras():
            if cam not in self._cameras:
                self.cache.drop(cam)

    def wants(self, camera: str) -> bool:
        return camera in self._cameras

    def stream_bytes(self, camera: str) -> tuple[int, int]:
        """(feature-delta codec bytes, full FP32 map bytes of the same frames) sent so far for ``camera``."""
        with self._lock:
            return self._bytes.get(camera, (0, 0))

    def _stream(self, camera: str, maps: Sequence[Any], refresh: bool) -> None:
        """delta.feature_stream: the message that brings a standby replica's copy of the maps to this frame's.
        The change mask and quantization run where the maps are and the message comes to the host (a few small
        copies, each waited for); the encoder's mirror of the receiver is then updated from the message (copied
        back up on the GPU path)."""
        with self._lock:
            if camera not in self._streams:
                return
            enc = self._encoders.get(camera)
            if enc is None:
                enc = self._encoders[camera] = FeatureDeltaEncoder(DEFAULT_THRESHOLD, self._runner.strides)
        msg = enc.encode(maps, force_refresh=refresh)
        full = sum(int(m.size) * 4 for m in maps)
        with self._lock:
            sent, total = self._bytes.get(camera, (0, 0))
            self._bytes[camera] = (sent + len(msg), total + full)

    def infer(self, rows: Any, items: Sequence[Prepared]) -> FeatureRows:
        """``rows[k]`` holds the letterboxed input of ``items[k]`` (FULL or REGIONS frames of features cameras);
        numpy rows on the CPU path, device rows (the engine's input dtype) on the GPU path."""
        t0 = time.perf_counter()
        run = self._runner
        per_row: list[FeatureMaps] = []
        work: list[float] = []
        for k, item in enumerate(items):
            cam = item.frame.camera
            ref = run.adopt(self.cache.get(cam)) if item.verdict.decision is Decision.REGIONS else None
            if ref is not None:
                res = run.recompute(rows[k], ref, item.verdict.regions)  # into the copy
                work.append(run.work_fraction(res.crop_pixels))
                maps = ref
            else:
                maps = run.features(rows[k : k + 1])[0]
                work.append(1.0)
            self.cache.put(cam, maps)  # a later frame of the camera in this batch starts from these
            self._stream(cam, maps, refresh=False)
            per_row.append(maps)
        if not per_row:
            return FeatureRows(np.zeros((0,), np.float32), ())
        xp = run.xp
        raw = run.head([xp.stack([maps[i] for maps in per_row]) for i in range(len(run.strides))])
        self.rows += len(per_row)
        self.busy_s += time.perf_counter() - t0
        return FeatureRows(raw, tuple(work))
