"""Frozen messages between the coordinator and the workers (they travel through DeploymentHandle calls)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.cache_transfer import CacheBlob, CacheRoute
from cluster.checkpoint import CheckpointInfo
from cluster.sequence import Lease, LeaseState
from cluster.topology import LinkMatrix
from daemon.config.model import CameraConfig
from daemon.guest import BorrowedState
from daemon.types import Frame, FrameError, FrameResult


@dataclass(frozen=True, slots=True)
class GroupGrant:
    """Run a group: its cameras, the sequence lease of each camera, and caches exported by its previous owner."""

    group: str
    cameras: tuple[CameraConfig, ...]
    leases: tuple[Lease, ...]
    caches: tuple[CacheBlob, ...] = ()
    reason: str = "home"  # "home" | "failover" | "rebalance" | "manual" | "recover"


@dataclass(frozen=True, slots=True)
class GroupHandoff:
    """What a worker hands back when it releases a group: each camera's exact next seq, and exported caches."""

    group: str
    leases: tuple[LeaseState, ...]
    caches: tuple[CacheBlob, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    """Who and where a worker replica is."""

    worker: str  # the deployment's worker name, e.g. "worker-1" (stable across replica restarts)
    instance: str  # this replica (changes when Serve replaces it)
    node: str  # Ray node id ("local" outside Ray)
    gpu: int | None  # GPU index on the node as Ray assigned it (None without a GPU)
    pid: int
    actor_name: str | None = None  # the replica's Ray actor name (what ray.kill needs)
    links: LinkMatrix | None = None  # the node's NVLink matrix from NVML (None without NVML)


@dataclass(frozen=True, slots=True)
class CameraStatus:
    camera: str
    alive: bool
    state: str
    processed: int
    dropped: int  # frames lost: dropped by the queue, or handed to the overflow peer and never returned
    overflowed: int = 0  # frames the queue handed to the overflow peer (cluster.overflow)


@dataclass(frozen=True, slots=True)
class OverflowBatch:
    """Overflow frames of a saturated home worker for its peer to process as a guest (cluster.overflow), with
    each camera's config and its borrowed delta state (daemon.guest)."""

    source: str  # the home worker
    frames: tuple[Frame, ...]
    cameras: tuple[CameraConfig, ...]
    states: tuple[BorrowedState, ...]


@dataclass(frozen=True, slots=True)
class OverflowReply:
    """The guest's answer: the frames' results (home frame seqs; the home numbers and publishes them)."""

    worker: str
    results: tuple[FrameResult, ...]
    errors: tuple[FrameError, ...] = ()
    warm: tuple[str, ...] = ()  # cameras whose borrowed state was installed
    refused: tuple[str, ...] = ()  # cameras whose borrowed arrays could not be read over peer access (not opened,
    # or the read failed after the handle opened; they ran cold;
    # the home counts them as peer_refused and lends bytes for a while: cluster.overflow.guest.GuestHost.peer_refused)
    guest_s: float = 0.0


@dataclass(frozen=True, slots=True)
class OverflowStats:
    """A worker's overflow figures since it started: as a home (its frames sent to its peer) and as a guest."""

    peer: str | None = None
    counts: tuple[tuple[str, int], ...] = ()  # sent, returned, late, refused, failed, given_up (cluster.overflow)
    guest_frames: int = 0  # frames processed here for other workers
    guest_decisions: tuple[tuple[str, int], ...] = ()  # of guest frames whose camera's state was installed
    guest_cold: int = 0  # guest frames processed without a usable borrowed state
    guest_refused: int = 0  # cameras whose peer arrays could not be read (route fell back or ran cold)
    guest_keyframes: int = 0  # warm guest frames planned FULL for want of a reference (borrowed state not usable)
    round_trip_ms: tuple[float, float] = (0.0, 0.0)  # p50, p99 of the home's answered batches (send to reply)
    # lent states by route (peer: CUDA IPC handles read over NVLink; host: bytes), as a home and as a guest
    home_routes: tuple[tuple[str, int], ...] = ()
    home_fallbacks: tuple[tuple[str, int], ...] = ()  # no_ipc, export_failed, peer_refused (cameras)
    guest_routes: tuple[tuple[str, int], ...] = ()
    guest_fallbacks: tuple[tuple[str, int], ...] = ()  # peer_access (ran cold), read_failed (the handle opened,
    # the read failed: ran cold), unusable (state refused: cold)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    identity: WorkerIdentity
    started_at: float  # wall clock
    groups: tuple[str, ...]
    leases: tuple[LeaseState, ...]
    heartbeat_age_s: float
    healthy: bool
    fps: float
    cameras: tuple[CameraStatus, ...] = ()
    fenced: int = 0
    overruns: int = 0
    cache_moves: tuple[tuple[str, int], ...] = ()  # ("warm", n), ("cold", n), ("failover_warm", n), ...
    backend: str = ""
    checkpoints: tuple[CheckpointInfo, ...] = ()  # descriptors of the latest camera states (fetched separately)
    overflow: OverflowStats = field(default_factory=OverflowStats)


@dataclass(frozen=True, slots=True)
class MoveRecord:
    """One group move as the coordinator saw it (monotonic seconds of the coordinator's clock)."""

    group: str
    source: str | None
    target: str
    reason: str
    detected_at: float  # failure noticed, or move decided
    done_at: float  # the target confirmed the assignment
    cameras: tuple[str, ...] = ()
    handover_seq: tuple[tuple[str, int], ...] = ()  # camera -> first seq of the new owner
    wall_done_at: float = 0.0
    checkpoints: tuple[tuple[str, float], ...] = ()  # fail-over: camera -> age of the checkpoint it was offered

    @property
    def duration_s(self) -> float:
        return self.done_at - self.detected_at


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker: str
    alive: bool
    instance: str | None
    groups: tuple[str, ...]
    misses: int
    last_ok_age_s: float | None


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    placement: tuple[tuple[str, str], ...]  # group -> worker
    home: tuple[tuple[str, str], ...]  # group -> home worker (sharding)
    unplaced: tuple[str, ...]
    workers: tuple[WorkerView, ...]
    moves: tuple[MoveRecord, ...]
    statuses: tuple[WorkerStatus, ...] = field(default=())


__all__ = [
    "CacheBlob", "CacheRoute", "CameraStatus", "ClusterStatus", "GroupGrant", "GroupHandoff", "MoveRecord",
    "OverflowBatch", "OverflowReply", "OverflowStats", "WorkerIdentity", "WorkerStatus", "WorkerView",
]
