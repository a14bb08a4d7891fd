"""The coordinator's logic, independent of Serve: poll workers, place groups, fail over, hand groups back.

Every ``poll_interval_s`` the coordinator asks every worker for its status (with a timeout). A worker is dead when
a call says its actor died, when ``misses_to_fail`` polls in a row go unanswered or report a stale pipeline
heartbeat, or when a different replica instance answers under its name (Serve replaced it). A dead worker's
groups move at once: to its NVLink peers first, then any live GPU with room under the bounded-load cap
(``cluster.placement``), each camera on a fresh sequence lease (``cluster.sequence``), cold (forced keyframe)
unless caches can be moved. A worker that comes back and stays healthy for ``rebalance_after_s`` gets its home
groups (``cluster.sharding``) back by graceful moves, which continue each camera's numbering exactly. A worker
holding a group placed elsewhere (it was wrongly declared dead) is told to release it.

Warm fail-over: the workers take camera-state checkpoints every ``checkpoint_interval_s`` (``cluster.checkpoint``).
Their bytes never ride on the status poll that judges liveness: the status describes them (camera, version,
age, size) and a loop of its own (``fetch_checkpoints``, every ``checkpoint_fetch_interval_s``, outside the
step's lock) fetches the changed ones from the cameras' current owners, at most ``checkpoint_fetch_bytes`` a
round; a failed fetch keeps the previous checkpoints. A dead worker's cameras get the latest fetched
checkpoints, with their age, in their grants.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cluster import sharding
from cluster.cache_transfer import CacheBlob, CacheRoute
from cluster.checkpoint import CheckpointCollector, CheckpointInfo, CheckpointOffer, CheckpointStore
from cluster.config import ClusterConfig, GroupConfig
from cluster.messages import (
    ClusterStatus,
    GroupGrant,
    GroupHandoff,
    MoveRecord,
    WorkerStatus,
    WorkerView,
)
from cluster.metrics import CoordinatorMetrics, MemorySink
from cluster.placement import GpuSite, Partners, failover_targets, overflow_peer, partners
from cluster.sequence import Lease, LeaseLedger
from cluster.spill import SpillBook
from cluster.topology import island_of, islands_from_links

log = logging.getLogger(__name__)

MAX_MOVE_RECORDS = 1000
MAX_REBALANCE_PER_STEP = 4


class WorkerGone(Exception):
    """The worker's actor is dead (not merely slow)."""


class WorkerUnhealthyReport(Exception):
    """The worker answered, but its pipeline heartbeat is stale."""


class WorkerClient(Protocol):
    """How the coordinator reaches one worker (a DeploymentHandle in Serve, a fake in unit tests)."""

    name: str

    async def status(self, extensions: Mapping[str, int]) -> WorkerStatus:
        """Liveness, leases, groups and checkpoint descriptors (small: never the checkpoints' bytes)."""
        ...

    async def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        """The latest checkpoints of ``cameras``, at most ``max_bytes`` in all."""
        ...

    async def assign(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]: ...

    async def release(self, groups: Sequence[str], route: CacheRoute) -> tuple[GroupHandoff, ...]: ...

    async def set_overflow_peer(self, peer: str | None) -> str | None:
        """Where the worker sends its overflow batches (only called with ``workers.overflow.enabled``)."""
        ...


@dataclass
class _Worker:
    client: WorkerClient
    instance: str | None = None
    alive: bool = False
    misses: int = 0
    first_miss: float | None = None
    last_ok: float | None = None
    healthy_since: float | None = None
    status: WorkerStatus | None = None
    site: GpuSite | None = None
    extensions: dict[str, int] = field(default_factory=dict)
    fetch_failures: int = 0  # checkpoint fetches failed in a row
    overflow_peer: tuple[str, str | None] | None = None  # (instance, peer) last told to the worker

    @property
    def name(self) -> str:
        return self.client.name


class ClusterControl:
    """Placement state and the control loop. Not thread-safe: run it on one event loop."""

    def __init__(
        self, cfg: ClusterConfig, clients: Sequence[WorkerClient], clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time, metrics: CoordinatorMetrics | None = None,
    ) -> None:
        if len(clients) != cfg.workers.count:
            raise ValueError(f"cluster config has workers.count {cfg.workers.count} but {len(clients)} clients")
        self.cfg = cfg
        self._clock = clock
        self._wall = wall
        self._workers = {c.name: _Worker(c) for c in clients}
        self._groups: dict[str, GroupConfig] = {g.id: g for g in cfg.groups}
        loads = {g.id: g.load for g in cfg.groups}
        self.home = sharding.assign(loads, list(self._workers), cfg.coordinator.load_factor)
        self.placement: dict[str, str] = {}
        self._placed_at: dict[str, float] = {}
        self._ledger = LeaseLedger(cfg.coordinator.seq_lease)
        self._moves: deque[MoveRecord] = deque(maxlen=MAX_MOVE_RECORDS)
        self._started = clock()
        self._recovered = False
        self._spill = SpillBook(cfg.coordinator)
        c = cfg.coordinator
        self._checkpoints = CheckpointStore(c.checkpoint_max_bytes, c.checkpoint_max_state_bytes)
        self._collector = CheckpointCollector(self._checkpoints, c.checkpoint_fetch_bytes)
        self._metrics = metrics if metrics is not None else CoordinatorMetrics(MemorySink())
        self._group_of = {cam.id: g.id for g in cfg.groups for cam in g.cameras}
        self._lock = asyncio.Lock()

    # -- public ---------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Step every poll interval until ``stop`` is set, and (with checkpoints on) fetch checkpoints every
        ``checkpoint_fetch_interval_s`` on a loop of its own; a failing round is logged, never fatal."""
        c = self.cfg.coordinator
        loops = [self._every(stop, self.step, c.poll_interval_s, "coordinator step")]
        if c.checkpoint_interval_s is not None:
            loops.append(self._every(stop, self.fetch_checkpoints, c.checkpoint_fetch_interval_s, "checkpoint fetch"))
        await asyncio.gather(*loops)

    async def _every(self, stop: asyncio.Event, work: Callable[[], Awaitable[object]], period: float,
                     what: str) -> None:
        while not stop.is_set():
            began = self._clock()
            try:
                await work()
            except Exception:
                log.exception("%s failed", what)
            try:
                await asyncio.wait_for(stop.wait(), max(0.01, period - (self._clock() - began)))
            except TimeoutError:
                pass

    async def step(self) -> None:
        async with self._lock:
            now = self._clock()
            polls = await asyncio.gather(*(self._poll(w) for w in self._workers.values()))
            dead: list[tuple[str, list[str], float]] = []
            for w, res in zip(self._workers.values(), polls, strict=True):
                orphans = self._observe(w, res, now)
                if orphans is not None:
                    dead.append(orphans)
            if not self._recovered:
                all_seen = all(w.alive for w in self._workers.values())
                if not (all_seen or now - self._started >= self.cfg.coordinator.startup_grace_s):
                    return
                self._recover()
            for worker, groups, detected in dead:
                await self._fail_over(worker, groups, detected)
            await self._place_unplaced(now)
            await self._reconcile(now)
            await self._rebalance(now)
            # overflow first (single batches to a peer, cluster.overflow); spill-over moves a whole group only
            # when its GPU still drops frames that overflow could not place
            await self._overflow_peers()
            await self._spill_over(now)

    async def fetch_checkpoints(self) -> int:
        """One checkpoint fetch round; the bytes kept. Never under the step's lock: a slow fetch delays no poll,
        fail-over or move, and what it brings is kept only where the worker still owns the camera then."""
        plan = self._collector.plan(self._clock())
        if not plan:
            return 0
        budget = self.cfg.coordinator.checkpoint_fetch_bytes
        spare = (budget - sum(i.nbytes for infos in plan.values() for i in infos)) // len(plan)
        kept = await asyncio.gather(*(self._fetch(w, inst, infos, sum(i.nbytes for i in infos) + spare)
                                      for (w, inst), infos in plan.items()))
        return sum(kept)

    async def move_group(self, group: str, target: str, reason: str = "manual") -> MoveRecord:
        """A graceful move of one group to ``target`` (exact seq hand-over)."""
        if group not in self._groups:
            raise KeyError(f"unknown group {group!r}")
        if target not in self._workers:
            raise KeyError(f"unknown worker {target!r}; workers: {sorted(self._workers)}")
        async with self._lock:
            return await self._graceful(group, target, reason)

    def snapshot(self) -> ClusterStatus:
        now = self._clock()
        views = tuple(
            WorkerView(w.name, w.alive, w.instance, tuple(sorted(g for g, p in self.placement.items() if p == w.name)),
                       w.misses, None if w.last_ok is None else now - w.last_ok)
            for w in self._workers.values()
        )
        return ClusterStatus(
            tuple(sorted(self.placement.items())), tuple(sorted(self.home.items())),
            tuple(sorted(set(self._groups) - set(self.placement))), views, tuple(self._moves),
            tuple(w.status for w in self._workers.values() if w.status is not None),
        )

    # -- polling --------------------------------------------------------------------------------------------
    async def _poll(self, w: _Worker) -> WorkerStatus | Exception:
        try:
            return await asyncio.wait_for(w.client.status(dict(w.extensions)), self.cfg.coordinator.call_timeout_s)
        except Exception as exc:  # timeouts, dead actors, anything: judged by _observe
            return exc

    def _observe(self, w: _Worker, res: WorkerStatus | Exception, now: float) -> tuple[str, list[str], float] | None:
        """Update a worker's view; (worker, its orphaned groups, detection time) when it just died.

        A status that reports a stale pipeline heartbeat counts as a missed poll: a stuck pipeline publishes
        nothing, and Serve's own health check replaces the replica only later."""
        if isinstance(res, WorkerStatus) and not res.healthy:
            w.status = res
            res = WorkerUnhealthyReport(f"{w.name}: pipeline heartbeat {res.heartbeat_age_s:.1f} s old")
        if isinstance(res, WorkerStatus):
            replaced = w.instance is not None and res.identity.instance != w.instance
            was_alive = w.alive
            first_miss = w.first_miss
            w.instance, w.alive, w.misses, w.first_miss, w.last_ok, w.status = (
                res.identity.instance, True, 0, None, now, res)
            if w.healthy_since is None or replaced:
                w.healthy_since = now
            w.site = _site(res)
            self._learn_leases(w, res)
            self._collector.offered(w.name, res.identity.instance, self._owned_checkpoints(w, res.checkpoints))
            if replaced and (was_alive or self._held_by(w.name)):
                lost = [g for g in self._held_by(w.name) if g not in res.groups]
                log.warning("%s was replaced (instance %s); its groups %s move", w.name, res.identity.instance, lost)
                return (w.name, lost, first_miss if first_miss is not None else now) if lost else None
            return None
        gone = isinstance(res, WorkerGone) or type(res).__name__ in ("ActorDiedError", "RayActorError")
        w.misses += 1
        if w.first_miss is None:
            w.first_miss = now
        if w.alive and (gone or w.misses >= self.cfg.coordinator.misses_to_fail):
            w.alive, w.healthy_since = False, None
            self._collector.withdraw(w.name)
            log.warning("%s declared dead (%s after %d missed polls)", w.name, type(res).__name__, w.misses)
            return (w.name, self._held_by(w.name), w.first_miss)
        return None

    def _learn_leases(self, w: _Worker, res: WorkerStatus) -> None:
        ext: dict[str, int] = {}
        mine = {c.id for g in self._held_by(w.name) for c in self._groups[g].cameras}
        for state in res.leases:
            if not self._recovered:
                self._ledger.adopt(state)
            if state.camera in mine:
                ceiling = self._ledger.extension(state)
                if ceiling is not None:
                    ext[state.camera] = ceiling
        w.extensions = ext

    def _owned_checkpoints(self, w: _Worker, infos: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        """The described checkpoints of cameras the worker owns (a worker wrongly declared dead must not
        overwrite the new owner's checkpoints)."""
        return [i for i in infos if self._owner(i.camera) == w.name]

    def _owner(self, camera: str) -> str | None:
        gid = self._group_of.get(camera)
        return None if gid is None else self.placement.get(gid)

    async def _fetch(self, name: str, instance: str, infos: Sequence[CheckpointInfo], max_bytes: int) -> int:
        """Fetch ``infos``' checkpoints from one worker; keep those of cameras it still owns (same instance)."""
        w = self._workers[name]
        cams = [i.camera for i in infos]
        try:
            offers = await asyncio.wait_for(w.client.checkpoints(cams, max_bytes),
                                            self.cfg.coordinator.checkpoint_fetch_timeout_s)
        except Exception as exc:
            w.fetch_failures += 1
            self._metrics.checkpoint_fetch(name, False, 0)
            if w.fetch_failures == 1:  # once per run of failures: a dying worker fails every round
                log.warning("fetching the checkpoints of %s from %s failed (%s: %s); the previous ones stay",
                            cams, name, type(exc).__name__, exc)
            return 0
        w.fetch_failures = 0
        self._metrics.checkpoint_fetch(name, True, sum(len(o.blob.data) for o in offers))
        return self._collector.received(
            name, instance, offers, lambda cam: w.alive and w.instance == instance and self._owner(cam) == name,
            self._clock())

    def _checkpoints_for(self, gid: str, now: float) -> tuple[CacheBlob, ...]:
        """The group's cameras' checkpoints young enough for a warm start, with their age."""
        max_age = self.cfg.coordinator.checkpoint_max_age_s
        blobs = (self._checkpoints.get(c.id, now, max_age) for c in self._groups[gid].cameras)
        return tuple(b for b in blobs if b is not None)

    def _held_by(self, worker: str) -> list[str]:
        return sorted(g for g, p in self.placement.items() if p == worker)

    def _recover(self) -> None:
        """First full view: adopt what running workers already host (a restarted coordinator)."""
        self._recovered = True
        for w in self._workers.values():
            if w.alive and w.status is not None:
                for gid in w.status.groups:
                    if gid in self._groups and gid not in self.placement:
                        self.placement[gid] = w.name
                        self._placed_at[gid] = self._clock()
        if self.placement:
            log.info("coordinator recovered placement of %d groups from the workers", len(self.placement))

    # -- moves ----------------------------------------------------------------------------------------------
    def _live(self, exclude: str | None = None) -> list[str]:
        return [w.name for w in self._workers.values() if w.alive and w.name != exclude]

    def _partners(self) -> dict[str, Partners]:
        sites = [w.site or GpuSite(w.name, "?") for w in self._workers.values()]
        return partners(sites)

    def _loads(self, live: Sequence[str], exclude: set[str]) -> dict[str, float]:
        loads = dict.fromkeys(live, 0.0)
        for gid, p in self.placement.items():
            if p in loads and gid not in exclude:
                loads[p] += self._groups[gid].load
        return loads

    def _lease(self, camera: str) -> Lease:
        if self._ledger.ceiling(camera) is not None:
            return self._ledger.failover(camera)
        return self._ledger.first(camera, self._ledger.first_start(self._wall()))

    async def _fail_over(self, dead: str, groups: list[str], detected: float) -> None:
        for gid in groups:
            self.placement.pop(gid, None)
        live = self._live(exclude=dead)
        if not groups or not live:
            if groups:
                log.error("no live worker for groups %s of %s; they wait", groups, dead)
            return
        total = sum(g.load for g in self._groups.values())
        targets = failover_targets(
            {g: self._groups[g].load for g in groups}, self._loads(live, set(groups)), live,
            self._partners()[dead].failover, total, self.cfg.coordinator.load_factor,
        )
        await self._grant_all(targets, "failover", dead, detected)

    async def _place_unplaced(self, now: float) -> None:
        """Groups without an owner go home, or (home down past the start-up grace) where fail-over would put them."""
        unplaced = sorted(set(self._groups) - set(self.placement), key=lambda g: (-self._groups[g].load, g))
        live = self._live()
        if not unplaced or not live:
            return
        loads = self._loads(live, set())
        total = sum(g.load for g in self._groups.values())
        in_grace = now - self._started < self.cfg.coordinator.startup_grace_s
        targets: dict[str, str] = {}
        for gid in unplaced:
            home = self._workers[self.home[gid]]
            if home.alive:
                target = home.name
            elif in_grace and home.last_ok is None:
                continue  # its home has not started yet
            else:
                target = failover_targets({gid: self._groups[gid].load}, loads, live,
                                          self._partners()[home.name].failover, total,
                                          self.cfg.coordinator.load_factor)[gid]
            targets[gid] = target
            loads[target] += self._groups[gid].load
        await self._grant_all(targets, "place", None, now)

    async def _grant_all(self, targets: Mapping[str, str], reason: str, source: str | None, detected: float) -> None:
        by_worker: dict[str, list[GroupGrant]] = {}
        now = self._clock()
        for gid, target in sorted(targets.items()):
            g = self._groups[gid]
            leases = tuple(self._lease(c.id) for c in g.cameras)
            caches = self._checkpoints_for(gid, now)
            by_worker.setdefault(target, []).append(GroupGrant(gid, g.cameras, leases, caches, reason))
        results = await asyncio.gather(*(self._assign(t, grants) for t, grants in by_worker.items()))
        done = self._clock()
        for (target, grants), ok in zip(by_worker.items(), results, strict=True):
            for grant in grants:
                if not ok:
                    continue
                self.placement[grant.group] = target
                self._placed_at[grant.group] = done
                if source is not None:
                    self._record(grant, source, target, reason, detected, done)
        for target, grants in by_worker.items():
            if grants and self.placement.get(grants[0].group) == target:
                cams = sum(len(g.cameras) for g in grants)
                ages = [round(b.age_s, 1) for g in grants for b in g.caches]
                log.info("%s: %s groups %s%s; %d of %d cameras offered a checkpoint (ages s %s), the rest cold",
                         target, reason, [g.group for g in grants],
                         f" from {source} in {done - detected:.2f} s" if source else "", len(ages), cams, ages)

    async def _assign(self, target: str, grants: Sequence[GroupGrant]) -> bool:
        try:
            await asyncio.wait_for(self._workers[target].client.assign(grants), self.cfg.coordinator.move_timeout_s)
            return True
        except Exception as exc:
            log.error("assigning %s to %s failed: %s", [g.group for g in grants], target, exc)
            return False

    def _record(self, grant: GroupGrant, source: str | None, target: str, reason: str, detected: float,
                done: float) -> None:
        self._moves.append(MoveRecord(
            grant.group, source, target, reason, detected, done, tuple(c.id for c in grant.cameras),
            tuple((lease.camera, lease.start) for lease in grant.leases), self._wall(),
            tuple((b.camera, b.age_s) for b in grant.caches) if reason in ("failover", "place") else (),
        ))

    async def _graceful(self, gid: str, target: str, reason: str) -> MoveRecord:
        source = self.placement.get(gid)
        began = self._clock()
        if source == target:
            raise ValueError(f"group {gid!r} is already on {target}")
        if source is None or not self._workers[source].alive:
            raise RuntimeError(f"group {gid!r} has no live owner to hand it over (fail-over handles it)")
        handoffs = await asyncio.wait_for(
            self._workers[source].client.release([gid], "peer" if self._peers(source, target) else "host"),
            self.cfg.coordinator.move_timeout_s)
        self.placement.pop(gid, None)
        g = self._groups[gid]
        states = {s.camera: s for h in handoffs for s in h.leases}
        leases = tuple(self._ledger.graceful(states[c.id]) if c.id in states else self._lease(c.id) for c in g.cameras)
        grant = GroupGrant(gid, g.cameras, leases, tuple(b for h in handoffs for b in h.caches), reason)
        if not await self._assign(target, [grant]):
            raise RuntimeError(f"group {gid!r}: released by {source} but {target} did not take it; it will be placed")
        done = self._clock()
        self.placement[gid] = target
        self._placed_at[gid] = done
        self._record(grant, source, target, reason, began, done)
        log.info("group %s moved %s -> %s (%s) in %.2f s", gid, source, target, reason, done - began)
        return self._moves[-1]

    def _peers(self, a: str, b: str) -> bool:
        return b in self._partners()[a].spill

    async def _reconcile(self, now: float) -> None:
        """Release groups a worker holds but should not; re-place groups it should hold but lost."""
        for w in list(self._workers.values()):
            if not w.alive or w.status is None or w.last_ok != now:
                continue
            stale = [g for g in w.status.groups if g in self._groups and self.placement.get(g) != w.name]
            if stale:
                log.warning("%s still hosts %s placed elsewhere: releasing", w.name, stale)
                try:
                    await asyncio.wait_for(w.client.release(stale, "host"), self.cfg.coordinator.move_timeout_s)
                except Exception as exc:
                    log.error("releasing stale groups %s from %s failed: %s", stale, w.name, exc)
            lost = [g for g in self._held_by(w.name) if g not in w.status.groups and self._placed_at.get(g, now) < now]
            if lost:
                log.warning("%s lost groups %s: placing them again", w.name, lost)
                await self._fail_over(w.name, lost, now)

    async def _rebalance(self, now: float) -> None:
        """Groups away from their home go back by graceful moves: after a fail-over once the home stayed healthy
        for ``rebalance_after_s``; after a spill-over once the home has room again (``cluster.spill``)."""
        after = self.cfg.coordinator.rebalance_after_s
        moved = 0
        for gid in sorted(self.placement):
            home = self._workers[self.home[gid]]
            current = self.placement[gid]
            spilled = self._spill.spilled_at(gid) is not None
            if current == home.name:
                self._spill.forget(gid)
                continue
            if not home.alive or home.healthy_since is None or not self._workers[current].alive:
                continue
            if not spilled and (after is None or now - home.healthy_since < after):
                continue
            if not self._spill.may_return(gid, home.name, now):
                continue  # spilled off a saturated home: stays on the peer until the home has room again
            try:
                await self._graceful(gid, home.name, "unspill" if spilled else "rebalance")
            except Exception as exc:
                log.error("moving group %s home to %s failed: %s", gid, home.name, exc)
            else:
                if spilled:
                    log.info("%s dropped %.1f%% of its frames over its last window: group %s came back from %s",
                             home.name, 100 * self._spill.pressure(home.name), gid, current)
                    self._spill.returned(gid, home.name, now)
            moved += 1
            if moved >= MAX_REBALANCE_PER_STEP:
                return

    async def _overflow_peers(self) -> None:
        """Tell every live worker its overflow peer (``workers.overflow``): its first live NVLink peer (or, without
        ``peer_only``, its first live fail-over partner); again whenever that changes or the replica was replaced."""
        ov = self.cfg.workers.overflow
        if not ov.enabled:
            return
        pts = self._partners()
        for w in self._workers.values():
            if not w.alive or w.instance is None:
                continue
            peer = overflow_peer(w.name, pts[w.name], lambda n: self._workers[n].alive, ov.peer_only)
            if w.overflow_peer == (w.instance, peer):
                continue
            try:
                await asyncio.wait_for(w.client.set_overflow_peer(peer), self.cfg.coordinator.call_timeout_s)
            except Exception as exc:
                log.warning("telling %s its overflow peer %s failed: %s", w.name, peer, exc)
                continue
            w.overflow_peer = (w.instance, peer)
            log.info("%s sends its overflow batches to %s", w.name, peer or "nobody (it drops them)")

    async def _spill_over(self, now: float) -> None:
        """Spill-over (``coordinator.spill_drop_fraction``): a saturated GPU hands a group to an idle NVLink peer
        by a graceful move, so the camera states travel with it (``cluster.spill``)."""
        if not self._spill.enabled:
            return
        live = [w for w in self._workers.values() if w.alive and w.status is not None]
        for w in live:
            if w.last_ok == now and w.status is not None:
                self._spill.observe(w.name, w.status.cameras, now)
        names = [w.name for w in live]
        held = {n: {g: self._groups[g].load for g in self._held_by(n)} for n in names}
        pts = self._partners()
        for gid, source, target in self._spill.moves(names, held, {n: pts[n].spill for n in names if n in pts}):
            log.info("%s drops %.0f%% of its frames: spilling group %s to its NVLink peer %s",
                     source, 100 * self._spill.pressure(source), gid, target)
            try:
                await self._graceful(gid, target, "spill")
            except Exception as exc:
                log.error("spilling group %s to %s failed: %s", gid, target, exc)
                continue
            cycle = self._spill.spilled(gid, source, target, now)
            self._metrics.spill_hold(gid, self._spill.hold_factor(gid), cycle is not None)
            if cycle is not None:
                log.warning("group %s spilled again %.0f s after it came home to %s (cycle %d): it stays on %s at "
                            "least %.0f s (%dx spill_hold_s)", gid, cycle.home_s, source, cycle.count, target,
                            self._spill.hold_s(gid), cycle.factor)


def _site(status: WorkerStatus) -> GpuSite:
    ident = status.identity
    island = None
    if ident.links is not None and ident.gpu is not None and ident.gpu < len(ident.links):
        island = island_of(islands_from_links(ident.links), ident.gpu)
    return GpuSite(ident.worker, ident.node, ident.gpu, island)


__all__ = ["ClusterControl", "WorkerClient", "WorkerGone"]
