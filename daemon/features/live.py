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
        self._lock = threading.Lock()

    @staticmethod
    def build(model: LoadedModel, cache: FeatureCache, threads: int = 0) -> FeatureStage:
        from daemon.features.split import split_model

        return FeatureStage(FeatureDeltaRunner(split_model(model), threads=threads), cache)

    def set_cameras(self, cameras: Sequence[str]) -> None:
        """The cameras in features mode now (config reloads); the others' reference maps are dropped."""
        with self._lock:
            self._cameras = frozenset(cameras)
        for cam in self.cache.cameras():
            if cam not in self._cameras:
                self.cache.drop(cam)

    def wants(self, camera: str) -> bool:
        return camera in self._cameras

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
                continue
            raw, maps = self._runner.full(rows[k : k + 1])
            self.cache.put(cam, maps[0])
            raws.append(raw)
            work.append(1.0)
        return FeatureRows(np.concatenate(raws) if raws else np.zeros((0,), np.float32), tuple(work))
