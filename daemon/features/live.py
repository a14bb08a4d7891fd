"""`delta.mode: features` in the live pipeline (CPU path): the inference stage hands the rows of features-mode
cameras to this stage instead of the engine. A FULL frame runs backbone + head and its backbone maps become the
camera's reference features; a REGIONS frame recomputes the backbone on its regions (plus halo), splices them
into the reference maps and runs the head on the whole spliced maps, so its detections cover the whole frame.

The reference maps are kept in the runtime's FeatureCache, which is also what `Runtime.export_camera` moves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from daemon.delta.policy import Decision
from daemon.features.cache import FeatureCache
from daemon.features.codec import DEFAULT_THRESHOLD, FeatureDeltaEncoder
from daemon.features.engine import FeatureDeltaRunner
from daemon.inference.model import LoadedModel
from daemon.pipeline.prepare import Prepared

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeatureRows:
    raw: NDArray[np.float32]  # (k, ...) raw outputs in the full model's layout, one per features row
    work: tuple[float, ...]  # per row: its convolution work as a share of a full frame's


class FeatureStage:
    def __init__(self, runner: FeatureDeltaRunner, cache: FeatureCache) -> None:
        self._runner = runner
        self.cache = cache
        self._cameras: frozenset[str] = frozenset()
        self._streams: frozenset[str] = frozenset()
        self._encoders: dict[str, FeatureDeltaEncoder] = {}
        self._bytes: dict[str, tuple[int, int]] = {}  # camera -> (codec bytes, full FP32 map bytes), cumulative
        self._lock = threading.Lock()

    @staticmethod
    def build(model: LoadedModel, cache: FeatureCache, threads: int = 0) -> FeatureStage:
        from daemon.features.split import split_model

        return FeatureStage(FeatureDeltaRunner(split_model(model), threads=threads), cache)

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

    def _stream(self, camera: str, maps: Sequence[NDArray[np.float32]], refresh: bool) -> None:
        """delta.feature_stream: the message that brings a standby replica's copy of the maps to this frame's."""
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

    def infer(self, rows: NDArray[np.float32], items: Sequence[Prepared]) -> FeatureRows:
        """``rows[k]`` holds the letterboxed input of ``items[k]`` (FULL or REGIONS frames of features cameras)."""
        raws: list[NDArray[np.float32]] = []
        work: list[float] = []
        for k, item in enumerate(items):
            cam = item.frame.camera
            ref = self.cache.get(cam)
            if item.verdict.decision is Decision.REGIONS and ref is not None:
                res = self._runner.regions(rows[k], ref, item.verdict.regions)  # ref becomes this frame's maps
                raws.append(res.raw)
                work.append(self._runner.work_fraction(res.crop_pixels))
                self._stream(cam, ref, refresh=False)
                continue
            raw, maps = self._runner.full(rows[k : k + 1])
            self.cache.put(cam, maps[0])
            raws.append(raw)
            work.append(1.0)
            self._stream(cam, maps[0], refresh=False)
        return FeatureRows(np.concatenate(raws) if raws else np.zeros((0,), np.float32), tuple(work))
