"""The coordinator deployment: one replica running the control loop (``cluster.control``) over DeploymentHandles.

It reaches each worker through the DeploymentHandle of that worker's deployment (``worker-K``, one replica each),
so every call lands on the GPU it names without an experimental router. Ingress of the app: ``status()`` and
``move_group()`` through a handle, or a JSON summary over HTTP when the app has a route prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.cache_transfer import CacheRoute
from cluster.checkpoint import CheckpointOffer
from cluster.config import ClusterConfig, worker_name
from cluster.control import ClusterControl, WorkerGone
from cluster.messages import ClusterStatus, GroupGrant, GroupHandoff, MoveRecord, WorkerStatus
from cluster.metrics import CoordinatorMetrics, ray_sink_or_memory

log = logging.getLogger(__name__)


class HandleClient:
    """A worker reached through its deployment's handle; a dead actor raises WorkerGone."""

    def __init__(self, name: str, handle: DeploymentHandle[Any]) -> None:
        self.name = name
        self._handle = handle

    async def status(self, extensions: Mapping[str, int]) -> WorkerStatus:
        result: WorkerStatus = await self._call("status", dict(extensions))
        return result

    async def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        result: tuple[CheckpointOffer, ...] = await self._call("checkpoints", list(cameras), max_bytes)
        return result

    async def assign(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        result: tuple[str, ...] = await self._call("assign_groups", list(grants))
        return result

    async def release(self, groups: Sequence[str], route: CacheRoute) -> tuple[GroupHandoff, ...]:
        result: tuple[GroupHandoff, ...] = await self._call("release_groups", list(groups), route)
        return result

    async def set_overflow_peer(self, peer: str | None) -> str | None:
        result: str | None = await self._call("set_overflow_peer", peer)
        return result

    async def _call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import ActorDiedError, RayActorError

        response = getattr(self._handle, method).remote(*args)
        try:
            return await response
        except (ActorDiedError, RayActorError) as exc:
            raise WorkerGone(f"{self.name}: {type(exc).__name__}") from exc
        except asyncio.CancelledError:
            response.cancel()  # a timed-out call must not linger on the worker's queue
            raise


class Coordinator:
    """Bound with the cluster config (a JSON dict) and the worker deployments, in worker order."""

    def __init__(self, cluster: dict[str, Any], *workers: DeploymentHandle[Any]) -> None:
        cfg = ClusterConfig.model_validate(cluster)
        clients = [HandleClient(worker_name(i), h) for i, h in enumerate(workers)]
        self._control = ClusterControl(cfg, clients, metrics=CoordinatorMetrics(ray_sink_or_memory()))
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        try:
            self._ensure_loop()  # Serve runs constructors on the replica's event loop
        except RuntimeError:
            log.debug("no running event loop yet: the control loop starts with the first call")

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._control.run(self._stop), name="coordinator")

    async def start(self) -> bool:
        """Start the control loop (idempotent; status and move_group start it too)."""
        self._ensure_loop()
        return True

    async def status(self) -> ClusterStatus:
        self._ensure_loop()
        return self._control.snapshot()

    async def move_group(self, group: str, worker: str) -> MoveRecord:
        self._ensure_loop()
        return await self._control.move_group(group, worker)

    async def __call__(self, request: Any) -> dict[str, Any]:
        self._ensure_loop()
        snap = self._control.snapshot()
        return {
            "placement": dict(snap.placement),
            "unplaced": list(snap.unplaced),
            "workers": [dataclasses.asdict(w) for w in snap.workers],
            "moves": [dataclasses.asdict(m) for m in snap.moves[-20:]],
        }

    async def check_health(self) -> None:
        self._ensure_loop()

    def __del__(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()


CoordinatorDeployment = serve.deployment(num_replicas=1, max_ongoing_requests=64)(Coordinator)

__all__ = ["Coordinator", "CoordinatorDeployment", "HandleClient"]
