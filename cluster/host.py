"""What a worker replica runs, without Serve: a daemon Runtime hosting the cameras of its assigned groups.

The Runtime owns the camera readers, the pipeline threads and the stats thread (the camera loop never runs on the
replica's event loop). Groups come and go through ``Runtime.apply_config``: the worker's daemon config is the
node template plus the cameras of its groups, so adding or removing a group touches only those cameras. Every
published detection is renumbered from the coordinator's sequence leases (``cluster.sequence``). With a
checkpoint interval, a thread exports every hosted camera's settled state that often (``cluster.checkpoint``);
its status describes them (no bytes) and the coordinator fetches the changed ones with ``checkpoints``,
for warm fail-over should this worker die.

Overflow (``workers.overflow``, cluster/overflow/): the runtime's single publisher is an ``OrderGate`` in front of
the numbering, so results of frames processed by the overflow peer go out in frame order with the home's own; with
overflow on, the queues hand full queues' oldest frames to an ``OverflowSender``. Every worker can also be a peer:
``guest`` runs another worker's overflow batch (``GuestHost``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from cluster.cache_transfer import CacheBlob, CacheRoute, CacheTransfer, CacheTransferFactory, RuntimeStateTransfer
from cluster.checkpoint import Checkpointer, CheckpointOffer, settled_checkpoint
from cluster.config import OVERFLOW_HOME_WAIT_S, HotSettings, NodeTemplate, OverflowSettings, worker_config
from cluster.messages import (
    CameraStatus,
    GroupGrant,
    GroupHandoff,
    OverflowBatch,
    OverflowReply,
    OverflowStats,
    WorkerIdentity,
    WorkerStatus,
)
from cluster.metrics import WorkerMetrics
from cluster.overflow import GuestHost, OrderGate, OverflowSender, PeerLink
from cluster.overflow.device import on_device, set_device
from cluster.sequence import LeaseState, SeqBook, SequencedPublisher
from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import CameraConfig, Config
from daemon.framequeue import Item
from daemon.publish import Publisher
from daemon.sources.base import Source

log = logging.getLogger(__name__)

PublisherFactory = Callable[[Config], list[Publisher]]
SourceFactory = Callable[[CameraConfig, Callable[[Item], object]], Source]


GATE_MAX_S = 5.0  # a moved camera's first frame waits at most this long for its state to be imported
T = TypeVar("T")


class WorkerUnhealthy(RuntimeError):
    """check_health's answer when the pipeline is stuck or the runtime is not running."""


def default_publishers(cfg: Config) -> list[Publisher]:
    from daemon.run import build_publishers

    return build_publishers(cfg, None)


class WorkerHost:
    """One GPU's runtime and the groups it hosts. Methods are thread-safe and block (call them off the loop)."""

    def __init__(
        self,
        identity: WorkerIdentity,
        template: NodeTemplate,
        heartbeat_max_age_s: float,
        metrics: WorkerMetrics,
        publishers: PublisherFactory = default_publishers,
        cache_transfer: CacheTransferFactory | None = None,
        source_factory: SourceFactory | None = None,
        engine: EngineChoice | None = None,
        checkpoint_interval_s: float | None = None,
        overflow: OverflowSettings | None = None,
    ) -> None:
        self.identity = identity
        self._overflow_settings = overflow if overflow is not None else OverflowSettings()
        self._gate: OrderGate | None = None
        self._sender: OverflowSender | None = None
        self._guest: GuestHost | None = None
        self._template = template
        self._max_age = heartbeat_max_age_s
        self._metrics = metrics
        self._publishers = publishers
        self._transfer_factory = cache_transfer
        self._source_factory = source_factory
        self._engine = engine
        self._book = SeqBook()
        self._lock = threading.RLock()  # serializes assign / release / reconfigure (they may take seconds)
        self._groups: dict[str, tuple[CameraConfig, ...]] = {}
        self._held: tuple[str, ...] = ()  # what status reports: replaced whole, read without the lock
        self._hot = HotSettings()
        self._runtime: Runtime | None = None
        self._transfer: CacheTransfer | None = None
        self._started_at = time.time()
        self._moves = {"warm": 0, "cold": 0, "failover_warm": 0, "failover_cold": 0}
        self._checkpoint_interval = checkpoint_interval_s
        self._checkpointer: Checkpointer | None = None
        self._cams_held: tuple[str, ...] = ()  # what the checkpointer exports: replaced whole, read without the lock
        self._gates: dict[str, threading.Event] = {}  # cameras whose first frame waits for their imported state
        self._gate_expired: set[str] = set()  # cameras whose frames stopped waiting: too late to import their state
        self._device: int | None = None  # the runtime's CUDA device (None: CPU path), current on its threads

    def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` with the runtime's CUDA device current (a new thread's is GPU 0; cluster.overflow.device)."""
        with on_device(self._device):
            return fn(*args)

    def _checkpoint(self, camera: str) -> CacheBlob | None:
        """The camera's settled snapshot (no wait, nothing copied under the tracker's lock) with the runtime's own
        state transfer; else (features mode, none settled yet, another transfer) the transfer's checkpoint."""
        transfer, runtime = self._transfer, self._runtime
        if transfer is None:
            return None
        if isinstance(transfer, RuntimeStateTransfer) and runtime is not None:
            blob = settled_checkpoint(runtime.settled_camera_state, camera, self.identity.worker,
                                      self._metrics.cache_timing)
            if blob is not None:
                return blob
        return self.on_device(transfer.checkpoint, camera)

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, hot: HotSettings | None = None) -> None:
        """Build and start the runtime with no camera yet (the engine warms up here)."""
        with self._lock:
            if self._runtime is not None:
                raise RuntimeError(f"{self.identity.worker}: already started")
            if hot is not None:
                self._hot = hot
            cfg = self._config()
            inner = [*self._publishers(cfg), self._metrics]
            self._gate = OrderGate(SequencedPublisher(inner, self._book))  # overflow results go out in frame order
            runtime = Runtime(cfg, [self._gate], engine=self._engine, source_factory=self._gated_source)
            runtime.start()
            self._runtime = runtime
            choice = runtime.engine_choice
            self._device = cfg.model.gpu_device if choice is not None and choice.gpu_decoder is not None else None
            self._guest = GuestHost(self.identity.worker, runtime, self._overflow_settings, self._metrics,
                                    device=self._device)
            if self._overflow_settings.enabled:
                self._guest.prepare()  # any worker may be another's overflow peer
                device = self._device
                self._sender = OverflowSender(self.identity.worker, self._overflow_settings, self._gate,
                                              self._guest.lend, self._camera_of, self._metrics,
                                              on_refused=self._guest.peer_refused,
                                              last_taken=runtime.queues.last_taken,
                                              thread_init=lambda: set_device(device))
                self._sender.start()
                runtime.queues.set_overflow(self._sender.offer)
            self._transfer = (self._transfer_factory(runtime) if self._transfer_factory is not None else
                              RuntimeStateTransfer(runtime, self.identity.worker, on_timing=self._metrics.cache_timing))
            self._metrics.cameras(0)
            if self._checkpoint_interval is not None:
                self._checkpointer = Checkpointer(self._checkpoint, lambda: self._cams_held,
                                                  self._checkpoint_interval, f"checkpoint:{self.identity.worker}")
                self._checkpointer.start()
            log.info("%s started (pid %d, gpu %s)", self.identity.worker, self.identity.pid, self.identity.gpu)

    def stop(self, timeout: float = 10.0) -> bool:
        with self._lock:
            runtime, self._runtime = self._runtime, None
            checkpointer, self._checkpointer = self._checkpointer, None
            sender, self._sender = self._sender, None
            guest, self._guest = self._guest, None
        if checkpointer is not None:
            checkpointer.stop(timeout / 2)
        if runtime is None:
            return True
        if sender is not None:
            runtime.queues.set_overflow(None)
            sender.stop(min(2.0, timeout / 4))
        if guest is not None:
            guest.stop(min(5.0, timeout / 4))
        clean = runtime.stop(timeout)
        log.info("%s stopped (%s)", self.identity.worker, "clean" if clean else "not clean")
        return clean

    def check_health(self) -> None:
        runtime = self._runtime
        if runtime is None:
            raise WorkerUnhealthy(f"{self.identity.worker}: runtime not running")
        age = runtime.heartbeat_age()
        if age > self._max_age:
            raise WorkerUnhealthy(
                f"{self.identity.worker}: pipeline heartbeat is {age:.1f} s old (limit {self._max_age:g} s)"
            )

    # -- groups ---------------------------------------------------------------------------------------------
    def assign(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        """Start the grants' groups (already hosted groups are left as they are); the groups now hosted."""
        with self._lock:
            runtime = self._require()
            new = [g for g in grants if g.group not in self._groups]
            if self._gate is not None:  # a camera back on this worker numbers its frames from its new source's 0
                self._gate.forget([c.id for g in new for c in g.cameras])
            for grant in new:
                for lease in grant.leases:
                    self._book.grant(lease)
                self._groups[grant.group] = grant.cameras
                for blob in grant.caches:  # the camera's first frame waits until its state is in
                    self._gates[blob.camera] = threading.Event()
            try:
                if new:
                    report = runtime.apply_config(self._config())
                    log.info("%s: assigned %s (cameras added %s)", self.identity.worker,
                             [g.group for g in new], list(report.added))
                for grant in new:
                    self._import_caches(grant)
            finally:
                for grant in new:
                    for blob in grant.caches:
                        gate = self._gates.pop(blob.camera, None)
                        if gate is not None:
                            gate.set()
            self._published_groups()
            return self._held

    def release(self, groups: Sequence[str], route: CacheRoute = "host") -> tuple[GroupHandoff, ...]:
        """Stop the groups' cameras and hand back each camera's next seq and exported caches."""
        with self._lock:
            runtime = self._require()
            held = [g for g in groups if g in self._groups]
            if not held:
                return ()
            ids = [c.id for g in held for c in self._groups[g]]
            self._stop_readers(runtime, [c for g in held for c in self._groups[g]])
            if self._gate is not None:  # overflow frames of these cameras come back (or are given up) before the fence
                self._settle(runtime, self._gate, ids)
            caches = {g: self._export_caches(self._groups[g], route) for g in held}
            released = {g: self._groups.pop(g) for g in held}
            runtime.apply_config(self._config())
            out = []
            for gid, cams in released.items():
                states = [s for s in (self._book.fence(c.id) for c in cams) if s is not None]
                out.append(GroupHandoff(gid, tuple(states), caches[gid]))
            if self._gate is not None:
                self._gate.forget(ids)  # what came after the fence is not this worker's any more
            if self._guest is not None:
                self._guest.forget(ids)
            self._published_groups()
            log.info("%s: released %s", self.identity.worker, held)
            return tuple(out)

    def extend(self, ceilings: Mapping[str, int]) -> None:
        for camera, ceiling in ceilings.items():
            self._book.extend(camera, ceiling)

    def reconfigure(self, hot: HotSettings) -> None:
        """Hot knobs: thresholds and delta settings change in place; the stats interval with the next record."""
        with self._lock:
            self._hot = hot
            if hot.log_level is not None:
                logging.getLogger("daemon").setLevel(hot.log_level)
                logging.getLogger("cluster").setLevel(hot.log_level)
            if self._runtime is not None:
                report = self._runtime.apply_config(self._config())
                log.info("%s: reconfigured (%s)", self.identity.worker, report)

    # -- status ---------------------------------------------------------------------------------------------
    def status(self) -> WorkerStatus:
        """Never waits for an assign or release in progress (the coordinator's polls must stay fast). Checkpoints
        are described, not carried (camera, version, age, size): their bytes come with ``checkpoints``."""
        runtime = self._runtime
        groups = self._held
        moves = tuple(sorted(self._moves.items()))
        checkpointer = self._checkpointer
        infos = () if checkpointer is None else checkpointer.infos()
        if runtime is None:
            return WorkerStatus(self.identity, self._started_at, groups, self._book.states(), float("inf"), False, 0.0)
        age = runtime.heartbeat_age()
        stats = runtime.latest_stats()
        health = runtime.health()
        counts = {c.camera: (c.processed, c.dropped) for c in stats.cameras} if stats else {}
        gate = self._gate
        cams = tuple(self._camera_status(runtime, gate, c.camera, c.alive, c.state, counts.get(c.camera, (0, 0)))
                     for c in health.cameras)
        return WorkerStatus(
            self.identity, self._started_at, groups, self._book.states(), age, age <= self._max_age,
            stats.fps if stats else 0.0, cams, self._book.fenced, self._book.overruns, moves,
            stats.backend if stats else "", infos, self._overflow_stats(),
        )

    def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        """The latest checkpoints of ``cameras`` this worker took, at most ``max_bytes`` (the first always comes);
        the coordinator asks for those whose version it has not got yet."""
        checkpointer = self._checkpointer
        return () if checkpointer is None else checkpointer.fetch(cameras, max_bytes)

    @staticmethod
    def _camera_status(runtime: Runtime, gate: OrderGate | None, camera: str, alive: bool, state: str,
                       counts: tuple[int, int]) -> CameraStatus:
        """Frames lost are those the queue dropped and overflow frames given up (their result never came back)."""
        lost = 0 if gate is None else gate.given_up_of(camera)
        return CameraStatus(camera, alive, state, counts[0], counts[1] + lost,
                            runtime.queues.counters(camera).overflowed)

    def _overflow_stats(self) -> OverflowStats:
        sender, guest = self._sender, self._guest
        counts = () if sender is None else tuple(sorted(sender.counts().items()))
        base = OverflowStats(None if sender is None else sender.peer, counts,
                             round_trip_ms=(0.0, 0.0) if sender is None else sender.round_trip_ms())
        return base if guest is None else guest.stats(base)

    # -- overflow -------------------------------------------------------------------------------------------
    def set_overflow_peer(self, link: PeerLink | None) -> None:
        """Where this worker's overflow frames go (None: they are dropped); the coordinator decides."""
        sender = self._sender
        if sender is not None:
            sender.set_peer(link)

    def guest(self, batch: OverflowBatch) -> OverflowReply:
        """Process another worker's overflow frames against their borrowed states (blocks; off the event loop)."""
        guest = self._guest
        if guest is None:
            raise WorkerUnhealthy(f"{self.identity.worker}: runtime not running")
        return guest.process(batch)

    def _camera_of(self, camera: str) -> CameraConfig | None:
        """The camera as the runtime runs it (hot thresholds and delta settings applied: ``worker_config``), its
        delta settings explicit (the guest's own config does not follow hot changes); None: not hosted."""
        rt = self._runtime
        cam = None if rt is None else next((c for c in rt.cfg.cameras if c.id == camera and c.enabled), None)
        if rt is None or cam is None:
            return None
        return cam.model_copy(update={"delta": cam.delta or rt.cfg.delta})

    def lease_states(self) -> tuple[LeaseState, ...]:
        return self._book.states()

    # -- internals ------------------------------------------------------------------------------------------
    def _require(self) -> Runtime:
        if self._runtime is None:
            raise WorkerUnhealthy(f"{self.identity.worker}: runtime not running")
        return self._runtime

    def _config(self) -> Config:
        cams = [c for gid in sorted(self._groups) for c in self._groups[gid]]
        return worker_config(self._template, self.identity.worker, cams, self._hot)

    def _gated_source(self, cam: CameraConfig, sink: Callable[[Item], object]) -> Source:
        """The camera's source, whose frames wait while the camera's moved state is being imported: a frame
        planned before the import would be planned cold (a keyframe) and race the imported reference."""
        gate = self._gates.get(cam.id)

        def gated(item: Item) -> object:
            if gate is not None and not gate.is_set() and not gate.wait(GATE_MAX_S):
                self._gate_expired.add(cam.id)  # frames go on cold; the late state must not replace theirs
            return sink(item)

        if self._source_factory is not None:
            return self._source_factory(cam, gated if gate is not None else sink)
        from daemon.cameras import build_source

        return build_source(cam, gated if gate is not None else sink)

    def _settle(self, runtime: Runtime, gate: OrderGate, ids: Sequence[str]) -> None:
        """Before the fence: the home's frames already taken by the pipeline are published (at most
        ``OVERFLOW_HOME_WAIT_S``), then the cameras' overflow frames come back or are given up."""
        deadline = time.monotonic() + OVERFLOW_HOME_WAIT_S
        taken = {c: runtime.queues.last_taken(c) for c in ids}
        while any(gate.home_seen(c) < t for c, t in taken.items()) and time.monotonic() < deadline:
            time.sleep(0.01)
        s = self._overflow_settings
        if not gate.settle(ids, (s.max_wait_ms + s.timeout_ms) / 1000.0):
            log.warning("%s: overflow frames of %s given up at their release", self.identity.worker, ", ".join(ids))

    @staticmethod
    def _stop_readers(runtime: Runtime, cams: Sequence[CameraConfig]) -> None:
        """Stop the cameras' readers and let their queued frames through the pipeline, so their states are exported
        with no frame left behind; the cameras are removed right after (no state is published meanwhile)."""
        ids = [cam.id for cam in cams]
        runtime.hold_states(ids)
        sources = [s for s in (runtime.sources.get(i) for i in ids) if s is not None]
        for src in sources:
            src.request_stop()  # all asked at once; then one shared deadline for all of them to end
        deadline = time.monotonic() + 2.0
        for src in sources:
            src.stop(max(0.0, deadline - time.monotonic()))
        while any(runtime.queues.depth(i) for i in ids) and time.monotonic() < deadline + 1.0:
            time.sleep(0.01)

    def _published_groups(self) -> None:
        self._metrics.cameras(sum(len(c) for c in self._groups.values()))
        self._held = tuple(sorted(self._groups))
        self._cams_held = tuple(c.id for g in self._held for c in self._groups[g])

    def _import_caches(self, grant: GroupGrant) -> None:
        warm: dict[str, float] = {}
        for blob in grant.caches:
            if blob.camera in self._gate_expired:
                self._gate_expired.discard(blob.camera)
                log.warning("%s: camera %s waited %.0f s for its state; it started cold, the state is not imported",
                            self.identity.worker, blob.camera, GATE_MAX_S)
                continue
            try:
                if self._transfer is not None and self._transfer.import_camera(blob):
                    warm[blob.camera] = blob.age_s
            except Exception:
                log.exception("%s: importing the caches of camera %s failed; it starts cold",
                              self.identity.worker, blob.camera)
        if grant.reason in ("home", "place") and not grant.caches:
            return  # a first start, not a move
        for cam in grant.cameras:
            kind = "warm" if cam.id in warm else "cold"
            self._moves[kind] += 1
            self._metrics.cache_move(kind)
            if grant.reason == "failover":
                self._moves[f"failover_{kind}"] += 1
                self._metrics.failover(kind, warm.get(cam.id))
        if grant.reason == "failover":
            offered = {b.camera for b in grant.caches}
            log.info("%s: fail-over of group %s: %s", self.identity.worker, grant.group, ", ".join(
                f"{c.id} warm (checkpoint {warm[c.id]:.1f} s old)" if c.id in warm else
                f"{c.id} cold ({'checkpoint refused' if c.id in offered else 'no checkpoint'}: keyframe)"
                for c in grant.cameras))

    def _export_caches(self, cams: Sequence[CameraConfig], route: CacheRoute) -> tuple[CacheBlob, ...]:
        out: list[CacheBlob] = []
        for cam in cams:
            try:
                blob = self._transfer.export_camera(cam.id, route) if self._transfer is not None else None
            except Exception:
                log.exception("%s: exporting the caches of camera %s failed", self.identity.worker, cam.id)
                blob = None
            if blob is not None:
                out.append(blob)
        return tuple(out)


__all__ = ["WorkerHost", "WorkerUnhealthy", "default_publishers"]
