"""The worker deployment: one Serve deployment per GPU (``worker-K``), one replica, ``num_gpus: 1``.

The replica hosts a daemon Runtime for its camera groups (``cluster.host.WorkerHost``). Its methods run the
blocking work in a thread (``asyncio.to_thread``): the replica's event loop only answers calls, the camera loop
lives on the Runtime's own threads. ``check_health`` raises on a stale pipeline heartbeat, so Serve replaces a
stuck replica; ``reconfigure`` applies the hot knobs of ``user_config``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve

from cluster.cache_transfer import CacheRoute
from cluster.config import HotSettings, NodeTemplate
from cluster.host import WorkerHost
from cluster.messages import GroupGrant, GroupHandoff, WorkerIdentity, WorkerStatus
from cluster.metrics import WorkerMetrics, ray_sink_or_memory
from cluster.topology import read_link_matrix

log = logging.getLogger(__name__)


def identify(worker: str) -> WorkerIdentity:
    """This replica's identity from Ray's runtime context (plain values outside Ray)."""
    instance, actor_name, node, gpu = uuid.uuid4().hex[:12], None, "local", None
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            node = ctx.get_node_id()
            actor_name = ctx.get_actor_name()
            gpu_ids = ray.get_gpu_ids()
            gpu = int(gpu_ids[0]) if gpu_ids else None
        instance = serve.get_replica_context().replica_id.unique_id
    except Exception:
        log.debug("not inside a Serve replica; identity from the process", exc_info=True)
    return WorkerIdentity(worker, instance, node, gpu, os.getpid(), actor_name, read_link_matrix())


class Worker:
    """A GPU worker. Bound with its name, the node template (a JSON dict), the heartbeat limit and the interval of
    its camera-state checkpoints (None: none, fail-overs of its cameras start cold)."""

    def __init__(self, worker: str, template: dict[str, Any], heartbeat_max_age_s: float,
                 checkpoint_interval_s: float | None = None) -> None:
        identity = identify(worker)
        metrics = WorkerMetrics(worker, ray_sink_or_memory())
        self._host = WorkerHost(identity, NodeTemplate.model_validate(template), heartbeat_max_age_s, metrics,
                                checkpoint_interval_s=checkpoint_interval_s)
        self._host.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._host.reconfigure(HotSettings.model_validate(user_config))

    def check_health(self) -> None:
        self._host.check_health()

    async def assign_groups(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        return await asyncio.to_thread(self._host.assign, grants)

    async def release_groups(self, groups: Sequence[str], route: CacheRoute = "host") -> tuple[GroupHandoff, ...]:
        return await asyncio.to_thread(self._host.release, groups, route)

    async def status(self, extensions: Mapping[str, int] | None = None,
                     since: tuple[str, int] | None = None) -> WorkerStatus:
        if extensions:
            self._host.extend(extensions)
        return await asyncio.to_thread(self._host.status, since)

    def __del__(self) -> None:
        host = getattr(self, "_host", None)
        if host is not None:
            host.stop(10.0)


WorkerDeployment = serve.deployment(num_replicas=1, max_ongoing_requests=16)(Worker)

__all__ = ["Worker", "WorkerDeployment", "identify"]
