"""The seam for warm camera moves: export a camera's reference caches on the old GPU, import them on the new one.

Today every move is cold: the new worker has no reference for the camera, so its first frame is a forced keyframe
(FULL inference) and delta caching resumes from there. A warm implementation (compressed feature deltas from
``daemon.features``, or a CUDA IPC handle an NVLink peer reads directly) plugs in through ``CacheTransfer``; the
worker calls ``export_camera`` before it stops a released camera and ``import_camera`` right after it starts an
assigned one, and counts each move as warm or cold in its metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from daemon.app import Runtime

CacheRoute = Literal["peer", "host", "network"]


@dataclass(frozen=True, slots=True)
class CacheBlob:
    """A camera's exported reference caches, as they travel between workers (must pickle)."""

    camera: str
    format: str  # e.g. "features-delta-v1", "cuda-ipc-v1"
    data: bytes
    full_bytes: int  # what the uncompressed caches would have cost (for the bytes-saved figures)
    source_worker: str = ""


class CacheTransfer(Protocol):
    def export_camera(self, camera: str, route: CacheRoute) -> CacheBlob | None:
        """The camera's caches for a move over ``route``, or None when there is nothing worth moving."""
        ...

    def import_camera(self, blob: CacheBlob) -> bool:
        """Install caches exported elsewhere; False when they cannot be used here (then the move is cold)."""
        ...


class ColdStart:
    """No cache transfer: a moved camera starts with a forced keyframe."""

    def export_camera(self, camera: str, route: CacheRoute) -> CacheBlob | None:
        return None

    def import_camera(self, blob: CacheBlob) -> bool:
        return False


CacheTransferFactory = Callable[["Runtime"], CacheTransfer]


def cold_start(runtime: Runtime) -> CacheTransfer:
    """The default factory: every move is cold."""
    return ColdStart()


__all__ = ["CacheBlob", "CacheRoute", "CacheTransfer", "CacheTransferFactory", "ColdStart", "cold_start"]
