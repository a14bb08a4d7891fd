"""Warm camera moves: export a camera's reference caches on the old GPU, import them on the new one.

The worker calls ``export_camera`` after it stopped a released camera's reader (so no frame of it is in flight)
and ``import_camera`` right after it starts an assigned one, and counts each move as warm or cold in its metrics.
``RuntimeStateTransfer`` (the default) moves the daemon's camera state in the ``daemon.features.state`` format
(DYCS v1: the delta signature reference, policy counters, noise floor, cached detections with their ages, and the
reference feature maps where the runtime keeps them); the bytes travel inside the GroupHandoff/GroupGrant through
Ray's object store whatever the route. An import that fails (another model, a malformed or missing state, delta
off on the new side) leaves the camera cold: a forced keyframe, FULL inference on its first frame. ``ColdStart``
moves nothing (every move cold), for comparison. ``checkpoint`` exports a running camera's settled state for warm
fail-over (``cluster.checkpoint``); a blob with an ``age_s`` is imported as that much older.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from daemon.app import Runtime
    from daemon.features.state import CameraState

CacheRoute = Literal["peer", "host", "network"]
STATE_FORMAT = "dycs-v1"  # daemon.features.state version 1

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheBlob:
    """A camera's exported reference caches, as they travel between workers (must pickle)."""

    camera: str
    format: str  # e.g. "features-delta-v1", "cuda-ipc-v1"
    data: bytes
    full_bytes: int  # what the uncompressed caches would have cost (for the bytes-saved figures)
    source_worker: str = ""
    age_s: float = 0.0  # a checkpoint (cluster.checkpoint): how old the state was when it was offered; 0: live


class CacheTransfer(Protocol):
    def export_camera(self, camera: str, route: CacheRoute) -> CacheBlob | None:
        """The camera's caches for a move over ``route``, or None when there is nothing worth moving."""
        ...

    def import_camera(self, blob: CacheBlob) -> bool:
        """Install caches exported elsewhere; False when they cannot be used here (then the move is cold)."""
        ...

    def checkpoint(self, camera: str) -> CacheBlob | None:
        """A settled state of a running camera (no frame in flight, a reference present) for a later warm
        fail-over, or None (the previous checkpoint stays)."""
        ...


class ColdStart:
    """No cache transfer: a moved camera starts with a forced keyframe."""

    def export_camera(self, camera: str, route: CacheRoute) -> CacheBlob | None:
        return None

    def import_camera(self, blob: CacheBlob) -> bool:
        return False

    def checkpoint(self, camera: str) -> CacheBlob | None:
        return None


@dataclass(frozen=True, slots=True)
class MoveTiming:
    """One export or import: which camera, how many bytes, how long (for the per-replica metrics)."""

    camera: str
    phase: Literal["export", "import", "checkpoint"]
    nbytes: int
    seconds: float
    ok: bool


class RuntimeStateTransfer:
    """Moves a camera's daemon state (``Runtime.export_camera`` / ``import_camera``) as DYCS v1 bytes."""

    def __init__(self, runtime: Runtime, worker: str = "", wait_s: float = 2.0,
                 on_timing: Callable[[MoveTiming], None] | None = None, checkpoint_wait_s: float = 0.2) -> None:
        self._rt = runtime
        self._worker = worker
        self._wait_s = wait_s
        self._checkpoint_wait_s = checkpoint_wait_s
        self._on_timing = on_timing

    def export_camera(self, camera: str, route: CacheRoute) -> CacheBlob | None:
        from daemon.features.state import StateError

        t = time.perf_counter()
        try:
            data = self._rt.export_camera(camera, self._wait_s)
        except StateError as exc:
            log.info("camera %s: no state to export (%s)", camera, exc)
            return None
        self._timed(MoveTiming(camera, "export", len(data), time.perf_counter() - t, True))
        return CacheBlob(camera, STATE_FORMAT, data, len(data), self._worker)

    def checkpoint(self, camera: str) -> CacheBlob | None:
        from daemon.features.state import StateError, to_bytes

        t = time.perf_counter()
        try:
            state = self._rt.export_camera_state(camera, self._checkpoint_wait_s)
        except StateError:
            return None  # delta off for the camera (or it is gone): nothing to keep
        if not state.policy.has_reference:
            return None  # a frame in flight, or no reference yet: an importer would need a keyframe anyway
        data = to_bytes(state)
        self._timed(MoveTiming(camera, "checkpoint", len(data), time.perf_counter() - t, True))
        return CacheBlob(camera, STATE_FORMAT, data, len(data), self._worker)

    def import_camera(self, blob: CacheBlob) -> bool:
        from daemon.features.state import StateError

        if blob.format != STATE_FORMAT:
            log.warning("camera %s: cache format %r is not %r; it starts cold", blob.camera, blob.format, STATE_FORMAT)
            self._rt.delta.request_keyframe(blob.camera)
            return False
        t = time.perf_counter()
        try:
            if blob.age_s > 0:
                self._rt.import_camera_state(blob.camera, _aged(blob.data, blob.age_s))
            else:
                self._rt.import_camera(blob.camera, blob.data)
        except StateError as exc:
            log.warning("camera %s: caches from %s not usable (%s); it starts cold", blob.camera,
                        blob.source_worker or "?", exc)
            self._rt.delta.request_keyframe(blob.camera)
            self._timed(MoveTiming(blob.camera, "import", len(blob.data), time.perf_counter() - t, False))
            return False
        self._timed(MoveTiming(blob.camera, "import", len(blob.data), time.perf_counter() - t, True))
        return True

    def _timed(self, timing: MoveTiming) -> None:
        if self._on_timing is not None:
            try:
                self._on_timing(timing)
            except Exception:
                log.exception("cache move timing callback failed")


def _aged(data: bytes, age_s: float) -> CameraState:
    """A checkpoint's state as if exported ``age_s`` ago: its keyframe clock, last inference and cached
    detections are that much older (the policy then asks for a keyframe when one has become due meanwhile)."""
    from daemon.features.state import from_bytes

    state = from_bytes(data, time.monotonic() - age_s)
    dets = tuple(replace(d, age_s=d.age_s + age_s) for d in state.detections)
    return replace(state, detections=dets)


CacheTransferFactory = Callable[["Runtime"], CacheTransfer]


def cold_start(runtime: Runtime) -> CacheTransfer:
    """Every move is cold (no state moves)."""
    return ColdStart()


def runtime_state(runtime: Runtime) -> CacheTransfer:
    """The default factory: camera states move as DYCS v1 bytes."""
    return RuntimeStateTransfer(runtime)


__all__ = ["STATE_FORMAT", "CacheBlob", "CacheRoute", "CacheTransfer", "CacheTransferFactory", "ColdStart",
           "MoveTiming", "RuntimeStateTransfer", "cold_start", "runtime_state"]
