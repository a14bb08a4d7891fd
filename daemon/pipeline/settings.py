"""Per-camera processing settings that commands and reloads may change while frames flow."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True, slots=True)
class CameraSettings:
    camera: str
    confidence: float
    iou: float
    max_detections: int
    class_ids: frozenset[int] | None  # None: every class
    roi: tuple[int, int, int, int] | None
    mask: tuple[NDArray[np.int32], ...]  # polygons painted out before inference
    # fidelity runs only (never set from a config): boxes scored above this and at or under ``confidence`` are kept
    # apart as the frame's below-threshold candidates (FrameResult.below), so AP can rank them as COCO does
    rank_floor: float | None = None


def resolve_class_ids(names: Sequence[str] | None, model_names: Sequence[str], camera: str) -> frozenset[int] | None:
    """Class names from a config -> model class ids; unknown names are an error naming the camera."""
    if names is None:
        return None
    index = {n: i for i, n in enumerate(model_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ValueError(
            f"camera {camera!r}: thresholds.classes has names the model does not know: {unknown} "
            f"(the model has {len(model_names)} classes, e.g. {list(model_names[:5])})"
        )
    return frozenset(index[n] for n in names)


class SettingsBoard:
    """Thread-safe map camera -> settings; readers get an immutable snapshot."""

    def __init__(self, rank_floor: float | None = None) -> None:
        self._lock = threading.Lock()
        self._settings: dict[str, CameraSettings] = {}
        self.rank_floor = rank_floor  # given to every camera's settings (fidelity runs: CameraSettings.rank_floor)

    def set(self, settings: CameraSettings) -> None:
        if self.rank_floor is not None and settings.rank_floor is None:
            settings = replace(settings, rank_floor=self.rank_floor)
        with self._lock:
            self._settings[settings.camera] = settings

    def remove(self, camera: str) -> None:
        with self._lock:
            self._settings.pop(camera, None)

    def get(self, camera: str) -> CameraSettings | None:
        with self._lock:
            return self._settings.get(camera)

    def update_thresholds(self, camera: str, confidence: float | None, iou: float | None) -> CameraSettings:
        with self._lock:
            cur = self._settings.get(camera)
            if cur is None:
                raise KeyError(camera)
            new = replace(
                cur,
                confidence=cur.confidence if confidence is None else confidence,
                iou=cur.iou if iou is None else iou,
            )
            self._settings[camera] = new
            return new

    def cameras(self) -> list[str]:
        with self._lock:
            return list(self._settings)
