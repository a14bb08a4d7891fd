"""Per-camera delta state: reference signature, noise floor, policy state and cached detections."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from daemon.delta.cache import SourceRect, merge_regions
from daemon.delta.changemap import ChangeMap, NoiseFloor, change_map
from daemon.delta.policy import CameraDeltaState, Decision, DeltaParams, Rect, Verdict, advance, decide
from daemon.delta.signature import SIGNATURE_FACTOR
from daemon.types import Detection, Letterbox


def content_rect(lb: Letterbox) -> Rect:
    """The part of the model input that holds image (not padding)."""
    x1, y1 = round(lb.pad_x), round(lb.pad_y)
    return Rect(x1, y1, x1 + round(lb.src_w * lb.scale), y1 + round(lb.src_h * lb.scale))


def to_source(r: Rect, lb: Letterbox) -> SourceRect:
    return SourceRect((r.x1 - lb.pad_x) / lb.scale, (r.y1 - lb.pad_y) / lb.scale,
                      (r.x2 - lb.pad_x) / lb.scale, (r.y2 - lb.pad_y) / lb.scale)


@dataclass(slots=True)
class _Camera:
    params: DeltaParams
    state: CameraDeltaState = field(default_factory=CameraDeltaState)
    noise: NoiseFloor = field(default_factory=NoiseFloor)
    reference: NDArray[np.uint8] | None = None
    boxes: tuple[Detection, ...] = ()
    born: tuple[float, ...] = ()
    last_inferred: float = 0.0
    force_key: bool = False


class DeltaTracker:
    """Decides per frame what to infer, and turns what was inferred into the frame's boxes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cams: dict[str, _Camera] = {}

    def configure(self, camera: str, params: DeltaParams | None) -> None:
        """``None`` switches delta caching off for the camera (every frame FULL)."""
        with self._lock:
            if params is None:
                self._cams.pop(camera, None)
            elif camera in self._cams:
                self._cams[camera].params = params
            else:
                self._cams[camera] = _Camera(params, noise=NoiseFloor(k=params.noise_k,
                                                                      min_threshold=params.min_threshold))

    def request_keyframe(self, camera: str) -> bool:
        with self._lock:
            cam = self._cams.get(camera)
            if cam is not None:
                cam.force_key = True
            return cam is not None

    def enabled(self, camera: str) -> bool:
        with self._lock:
            return camera in self._cams

    def plan(self, camera: str, signature: NDArray[np.uint8], lb: Letterbox, now: float) -> Verdict:
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return Verdict(Decision.FULL, "delta off")
            p = cam.params
            cmap: ChangeMap | None = None
            if cam.reference is not None and cam.reference.shape == signature.shape:
                cmap = change_map(signature, cam.reference, p.tile // SIGNATURE_FACTOR, cam.noise)
            state = CameraDeltaState() if cam.force_key else cam.state
            cam.force_key = False
            content = content_rect(lb)
            verdict = decide(state, cmap, now, p, content)
            cam.state = advance(state, verdict, cmap, now)
            if verdict.decision is Decision.FULL or cam.reference is None:
                cam.reference = signature.copy()
            elif verdict.decision is Decision.REGIONS:
                f = SIGNATURE_FACTOR
                for r in verdict.regions:
                    cam.reference[r.y1 // f : r.y2 // f, r.x1 // f : r.x2 // f] = \
                        signature[r.y1 // f : r.y2 // f, r.x1 // f : r.x2 // f]
            return verdict

    def resolve(self, camera: str, verdict: Verdict, fresh: Sequence[Detection], lb: Letterbox,
                now: float) -> tuple[tuple[Detection, ...], float]:
        """The boxes to publish for this frame, and the age of the oldest information they rest on."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return tuple(fresh), 0.0
            if verdict.decision is Decision.FULL:
                cam.boxes, cam.born = tuple(fresh), tuple(now for _ in fresh)
                cam.last_inferred = now
            elif verdict.decision is Decision.REGIONS:
                regions = [to_source(r, lb) for r in verdict.regions]
                old = dict(zip(cam.boxes, cam.born, strict=True))
                merged = merge_regions(cam.boxes, fresh, regions)
                fresh_ids = {id(d) for d in fresh}
                cam.born = tuple(now if id(d) in fresh_ids else old[d] for d in merged)
                cam.boxes = merged
            out = tuple(
                _aged(d, now - t) for d, t in zip(cam.boxes, cam.born, strict=True)
            )
            return out, now - cam.last_inferred


def _aged(d: Detection, age: float) -> Detection:
    if age <= 0:
        return d
    return Detection(d.class_id, d.class_name, d.score, d.x1, d.y1, d.x2, d.y2, cached=True, age_s=age)


def params_from_config(cfg: object) -> DeltaParams | None:
    """A DeltaConfig section -> DeltaParams, or None when delta caching is off."""
    from daemon.config.model import DeltaConfig

    if not isinstance(cfg, DeltaConfig) or not cfg.enabled:
        return None
    return DeltaParams(
        tile=cfg.tile, keyframe_frames=cfg.keyframe_frames, keyframe_s=cfg.keyframe_s,
        full_fraction=cfg.full_fraction, brightness_full=cfg.brightness_full, drift_tiles=cfg.drift_tiles,
        margin_tiles=cfg.margin_tiles, max_regions=cfg.max_regions, max_area_fraction=cfg.max_area_fraction,
        noise_k=cfg.noise_k, min_threshold=cfg.min_threshold,
    )
