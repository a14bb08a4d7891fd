"""The worker deployment: one Serve deployment per GPU (``worker-K``), one replica, ``num_gpus: 1``.

The replica hosts a daemon Runtime for its camera groups (``cluster.host.WorkerHost``). Its methods run the
blocking work in a thread (``asyncio.to_thread``): the replica's event loop only answers calls, the camera loop
lives on the Runtime's own threads. ``check_health`` raises on a stale pipeline heartbeat, so Serve replaces a
stuck replica; ``reconfigure`` applies the hot knobs of ``user_config``.

Overflow (``workers.overflow``, cluster/overflow/): the coordinator names each worker's overflow peer
(``set_overflow_peer``); the worker reaches it through the peer deployment's DeploymentHandle and calls its
``guest_process`` from the overflow thread (``HandleLink``). CUDA IPC between two workers needs both GPUs visible
in both processes, while Ray gives an actor only its own GPU (it sets CUDA_VISIBLE_DEVICES). With
``workers.overflow.all_devices_visible`` the replicas start with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``
(Ray then leaves CUDA_VISIBLE_DEVICES alone and ``ray.get_gpu_ids()`` returns the node's GPU indices): each worker
runs its runtime on its own GPU (``model.gpu_device``: the CUDA ordinal of ``ray.get_gpu_ids()[0]``, made current on
every thread that touches the runtime's device memory: cluster.overflow.device) and can open its peer's IPC handles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ray import serve

from cluster.cache_transfer import CacheRoute
from cluster.checkpoint import CheckpointOffer
from cluster.config import HotSettings, NodeTemplate, OverflowSettings
from cluster.host import WorkerHost
from cluster.messages import GroupGrant, GroupHandoff, OverflowBatch, OverflowReply, WorkerIdentity, WorkerStatus
from cluster.metrics import WorkerMetrics, ray_sink_or_memory
from cluster.overflow.device import cuda_ordinal, set_device
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


NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"

T = TypeVar("T")


class GuestBusy(RuntimeError):
    """guest_process's answer while another overflow batch already waits for the guest pipeline."""


class HandleLink:
    """The overflow peer's ``guest_process`` through its deployment's handle (called from the overflow thread,
    never from the replica's event loop)."""

    def __init__(self, name: str, app: str) -> None:
        self.name = name
        self._handle = serve.get_deployment_handle(name, app_name=app)

    def call(self, batch: OverflowBatch, timeout_s: float) -> OverflowReply:
        response = self._handle.guest_process.remote(batch)
        try:
            reply: OverflowReply = response.result(timeout_s=timeout_s)
        except TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]
            raise
        return reply


def own_gpu_template(template: NodeTemplate, gpu: int | None) -> NodeTemplate:
    """With every GPU of the node visible, the runtime runs on the worker's own (Ray's) GPU index."""
    if gpu is None:
        return template
    return template.model_copy(update={"model": template.model.model_copy(update={"gpu_device": gpu})})


class Worker:
    """A GPU worker. Bound with its name, the node template (a JSON dict), the heartbeat limit, the interval of
    its camera-state checkpoints (None: none, fail-overs of its cameras start cold) and its overflow settings."""

    def __init__(self, worker: str, template: dict[str, Any], heartbeat_max_age_s: float,
                 checkpoint_interval_s: float | None = None, overflow: dict[str, Any] | None = None) -> None:
        identity = identify(worker)
        metrics = WorkerMetrics(worker, ray_sink_or_memory())
        settings = OverflowSettings.model_validate(overflow or {})
        node = NodeTemplate.model_validate(template)
        if settings.all_devices_visible and os.environ.get(NOSET_CUDA_VISIBLE_DEVICES) == "1":
            ordinal = cuda_ordinal(identity.gpu)  # Ray's GPU id is the node's, not always this process's ordinal
            node = own_gpu_template(node, ordinal)
            try:
                set_device(ordinal)  # this thread builds the runtime: its arrays on the worker's own GPU
            except Exception as exc:
                log.warning("%s: making GPU %s current failed: %s", worker, ordinal, exc)
        self._app = "deltayolo"
        try:
            self._app = serve.get_replica_context().app_name
        except Exception:
            log.debug("no replica context: overflow peers are looked up in app %s", self._app)
        self._host = WorkerHost(identity, node, heartbeat_max_age_s, metrics,
                                checkpoint_interval_s=checkpoint_interval_s, overflow=settings)
        self._host.start()
        # guest batches on a thread of their own, one queued at most: a timed-out call's thread goes on running,
        # it must not fill the default executor that status() and the other calls use
        self._guests = ThreadPoolExecutor(1, thread_name_prefix=f"guest:{worker}")
        self._guest_calls = 0
        self._guest_lock = threading.Lock()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a thread, with the runtime's CUDA device current there (threads start on GPU 0)."""
        return await asyncio.to_thread(self._host.on_device, fn, *args)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._host.reconfigure(HotSettings.model_validate(user_config))

    def check_health(self) -> None:
        self._host.check_health()

    async def assign_groups(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        return await self._run(self._host.assign, grants)

    async def release_groups(self, groups: Sequence[str], route: CacheRoute = "host") -> tuple[GroupHandoff, ...]:
        return await self._run(self._host.release, groups, route)

    async def status(self, extensions: Mapping[str, int] | None = None) -> WorkerStatus:
        if extensions:
            self._host.extend(extensions)
        return await asyncio.to_thread(self._host.status)

    async def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        """Camera-state checkpoints for the coordinator, apart from the status poll (they may be megabytes)."""
        return await self._run(self._host.checkpoints, cameras, max_bytes)

    async def set_overflow_peer(self, peer: str | None) -> str | None:
        """Send overflow frames to worker ``peer`` from now on (None: drop them)."""
        self._host.set_overflow_peer(None if peer is None else HandleLink(peer, self._app))
        return peer

    async def guest_process(self, batch: OverflowBatch) -> OverflowReply:
        """Another worker's overflow batch: refused at once (the home drops its frames) while one is already
        waiting behind the batch being processed."""
        with self._guest_lock:
            if self._guest_calls >= 2:
                raise GuestBusy(f"{self._host.identity.worker}: an overflow batch is already waiting")
            self._guest_calls += 1
        fut = self._guests.submit(self._host.on_device, self._host.guest, batch)
        fut.add_done_callback(self._guest_done)  # counted until it ends, even when the caller gave up waiting
        return await asyncio.wrap_future(fut)

    def _guest_done(self, _fut: object) -> None:
        with self._guest_lock:
            self._guest_calls -= 1

    def __del__(self) -> None:
        host = getattr(self, "_host", None)
        if host is not None:
            host.stop(10.0)
        guests = getattr(self, "_guests", None)
        if guests is not None:
            guests.shutdown(wait=False)


WorkerDeployment = serve.deployment(num_replicas=1, max_ongoing_requests=16)(Worker)

__all__ = ["GuestBusy", "HandleLink", "Worker", "WorkerDeployment", "identify", "own_gpu_template"]
