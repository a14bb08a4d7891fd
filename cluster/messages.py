"""Frozen messages between the coordinator and the workers (they travel through DeploymentHandle calls)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.cache_transfer import CacheBlob, CacheRoute
from cluster.checkpoint import CheckpointOffer
from cluster.sequence import Lease, LeaseState
from cluster.topology import LinkMatrix
from daemon.config.model import CameraConfig


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
    dropped: int


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
    checkpoints: tuple[CheckpointOffer, ...] = ()  # camera states taken since the poll's ``since`` serial
    checkpoint_serial: int = 0  # the latest checkpoint serial of this instance (the next poll's ``since``)


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
    "WorkerIdentity", "WorkerStatus", "WorkerView",
]
