"""The coordinator's control loop against in-process workers: placement, fail-over, hand-back, recovery, leases.

The workers here are fakes of the WorkerClient protocol (a Ray actor cannot exist in these unit tests; the real
deployments are exercised in test_cluster_ray.py); they number messages with the real SeqBook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from cluster.cache_transfer import CacheRoute
from cluster.checkpoint import CheckpointOffer
from cluster.config import ClusterConfig, validate_cluster_data
from cluster.control import ClusterControl, WorkerGone
from cluster.messages import GroupGrant, GroupHandoff, WorkerIdentity, WorkerStatus
from cluster.sequence import SeqBook

LEASE = 100


class FakeWorker:
    def __init__(self, name: str, gpu: int | None = None, links: tuple[tuple[int, ...], ...] | None = None) -> None:
        self.name = name
        self.gpu = gpu
        self.links = links
        self.instance = "a"
        self.mode = "ok"  # ok | gone | hang | stuck (answers, pipeline heartbeat stale)
        self.groups: dict[str, GroupGrant] = {}
        self.book = SeqBook()
        self.released: list[str] = []
        self.published: dict[str, list[int]] = {}

    async def status(self, extensions: Mapping[str, int]) -> WorkerStatus:
        await self._gate()
        for cam, ceiling in extensions.items():
            self.book.extend(cam, ceiling)
        ident = WorkerIdentity(self.name, self.instance, "node0", self.gpu, 1, None, self.links)
        stuck = self.mode == "stuck"
        return WorkerStatus(ident, 0.0, tuple(sorted(self.groups)), self.book.states(), 30.0 if stuck else 0.1,
                            not stuck, 1.0)

    async def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        await self._gate()
        return ()

    async def assign(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        await self._gate()
        for g in grants:
            if g.group not in self.groups:
                self.groups[g.group] = g
                for lease in g.leases:
                    self.book.grant(lease)
        return tuple(sorted(self.groups))

    async def release(self, groups: Sequence[str], route: CacheRoute) -> tuple[GroupHandoff, ...]:
        await self._gate()
        out = []
        for gid in groups:
            g = self.groups.pop(gid, None)
            if g is not None:
                self.released.append(gid)
                states = tuple(s for s in (self.book.fence(c.id) for c in g.cameras) if s is not None)
                out.append(GroupHandoff(gid, states))
        return tuple(out)

    def publish(self, n: int) -> None:
        """Every hosted camera publishes ``n`` messages."""
        for g in self.groups.values():
            for cam in g.cameras:
                for _ in range(n):
                    seq = self.book.take(cam.id)
                    if seq is not None:
                        self.published.setdefault(cam.id, []).append(seq)

    def restart(self) -> None:
        self.instance += "'"
        self.groups.clear()
        self.book = SeqBook()

    async def _gate(self) -> None:
        if self.mode == "gone":
            raise WorkerGone(self.name)
        if self.mode == "hang":
            await asyncio.sleep(5)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_cfg(workers: int, groups: int, **coordinator: Any) -> ClusterConfig:
    gs = [{"id": f"g{k}", "cameras": [{"id": f"c{k}", "source": {"type": "replay", "path": "builtin:vtest"}}]}
          for k in range(groups)]
    coord = {"call_timeout_s": 0.05, "seq_lease": LEASE, "startup_grace_s": 5, "rebalance_after_s": None,
             **coordinator}
    return validate_cluster_data({
        "node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"}},
        "groups": gs, "workers": {"count": workers}, "coordinator": coord,
    })


def _links_two_islands() -> tuple[tuple[int, ...], ...]:
    """GPUs 0+2 and 1+3 share NVLinks: GPU 0's peer is not the next index (that would be PCIe-only GPU 1)."""
    return tuple(tuple(12 if (i % 2 == j % 2 and i != j) else 0 for j in range(4)) for i in range(4))


def setup(
    workers: int, groups: int, links: bool = False, **coordinator: Any
) -> tuple[ClusterControl, list[FakeWorker], Clock]:
    fakes = [FakeWorker(f"worker-{i}", i, _links_two_islands() if links else None) for i in range(workers)]
    clock = Clock()
    return ClusterControl(make_cfg(workers, groups, **coordinator), fakes, clock, wall=lambda: 0.0), fakes, clock


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_initial_placement_follows_sharding_with_leases_from_zero() -> None:
    ctl, fakes, _ = setup(2, 6)
    run(ctl.step())
    assert ctl.placement == ctl.home
    for f in fakes:
        assert set(f.groups) == {g for g, w in ctl.home.items() if w == f.name}
        assert all(s.next_seq == 0 and s.ceiling == LEASE for s in f.book.states())
    assert ctl.snapshot().moves == ()


def test_dead_worker_groups_go_to_its_nvlink_peer_with_a_jump_to_the_lease_ceiling() -> None:
    ctl, fakes, _ = setup(4, 8, links=True)

    async def scenario() -> None:
        await ctl.step()
        fakes[0].publish(7)
        fakes[0].mode = "gone"
        await ctl.step()

    run(scenario())
    orphaned = sorted(g for g, w in ctl.home.items() if w == "worker-0")
    assert orphaned
    peer_before = sum(1 for w in ctl.home.values() if w == "worker-2")
    cap = 4  # ceil(1.25 * 8 groups / 3 live GPUs)
    to_peer = [g for g in orphaned if ctl.placement[g] == "worker-2"]  # GPU 0's NVLink peer is GPU 2, not GPU 1
    assert len(to_peer) == min(len(orphaned), cap - peer_before) > 0
    moves = ctl.snapshot().moves
    assert sorted(m.group for m in moves) == orphaned
    assert {m.reason for m in moves} == {"failover"}
    for m in moves:
        assert all(start == LEASE for _, start in m.handover_seq)
    for f in fakes[1:]:
        f.publish(3)
    for gid in orphaned:
        cam = f"c{gid[1:]}"
        assert fakes[0].published[cam] == list(range(7))
        new_owner = fakes[int(ctl.placement[gid][-1])]
        assert new_owner.published[cam] == [LEASE, LEASE + 1, LEASE + 2]


def test_missed_polls_declare_death_only_after_misses_to_fail() -> None:
    ctl, fakes, _ = setup(2, 4, misses_to_fail=2)

    async def scenario() -> list[dict[str, str]]:
        await ctl.step()
        fakes[1].mode = "hang"
        seen = []
        for _ in range(2):
            await ctl.step()
            seen.append(dict(ctl.placement))
        return seen

    after_one, after_two = run(scenario())
    assert after_one == ctl.home
    assert set(after_two.values()) == {"worker-0"}


def test_a_replaced_replica_loses_its_groups_to_the_survivor() -> None:
    ctl, fakes, _ = setup(2, 4)

    async def scenario() -> None:
        await ctl.step()
        fakes[0].restart()  # Serve started a new replica under the same name
        await ctl.step()

    run(scenario())
    assert set(ctl.placement.values()) == {"worker-1"}
    assert fakes[0].groups == {}


def test_a_wrongly_declared_dead_worker_releases_its_stale_groups() -> None:
    ctl, fakes, _ = setup(2, 4)

    async def scenario() -> None:
        await ctl.step()
        fakes[0].mode = "gone"
        await ctl.step()
        fakes[0].mode = "ok"  # it was alive after all (partition healed)
        await ctl.step()

    run(scenario())
    assert fakes[0].groups == {}
    assert sorted(fakes[0].released) == sorted(g for g, w in ctl.home.items() if w == "worker-0")
    assert set(ctl.placement.values()) == {"worker-1"}


def test_recovered_worker_gets_its_groups_back_with_exact_seq_continuation() -> None:
    ctl, fakes, clock = setup(2, 4, rebalance_after_s=10)

    async def scenario() -> None:
        await ctl.step()
        fakes[0].mode = "gone"
        await ctl.step()
        fakes[1].publish(5)
        fakes[0].restart()
        fakes[0].mode = "ok"
        await ctl.step()  # back, healthy since now
        clock.t += 5
        await ctl.step()  # not long enough
        assert set(ctl.placement.values()) == {"worker-1"}
        clock.t += 6
        await ctl.step()  # healthy for 11 s: groups go home

    run(scenario())
    assert ctl.placement == ctl.home
    fakes[0].publish(2)
    reasons = [m.reason for m in ctl.snapshot().moves]
    assert reasons.count("rebalance") == sum(1 for w in ctl.home.values() if w == "worker-0")
    for gid, w in ctl.home.items():
        if w == "worker-0":
            cam = f"c{gid[1:]}"
            assert fakes[1].published[cam] == [LEASE + i for i in range(5)]
            assert fakes[0].published[cam] == [LEASE + 5, LEASE + 6]  # contiguous across the graceful move


def test_restarted_coordinator_adopts_what_workers_run() -> None:
    ctl, fakes, _ = setup(2, 4)
    run(ctl.step())
    fakes[0].publish(3)
    fresh = ClusterControl(ctl.cfg, fakes, Clock(), wall=lambda: 0.0)
    run(fresh.step())
    assert fresh.placement == ctl.placement
    assert fresh.snapshot().moves == ()
    fakes[0].mode = "gone"
    run(fresh.step())
    moved = [m for m in fresh.snapshot().moves if m.source == "worker-0"]
    assert moved and all(start == LEASE for m in moved for _, start in m.handover_seq)


def test_lease_is_extended_before_it_runs_out() -> None:
    ctl, fakes, _ = setup(1, 1)

    async def scenario() -> None:
        await ctl.step()
        fakes[0].publish(LEASE // 2 + 1)
        await ctl.step()  # sees half used: grants a new ceiling with the next poll
        await ctl.step()

    run(scenario())
    (state,) = fakes[0].book.states()
    assert state.ceiling == 2 * LEASE
    assert fakes[0].book.overruns == 0


def test_manual_move_is_graceful_and_checks_names() -> None:
    ctl, fakes, _ = setup(2, 2)

    async def scenario() -> None:
        await ctl.step()
        gid = "g0"
        source = ctl.placement[gid]
        target = "worker-1" if source == "worker-0" else "worker-0"
        fakes[int(source[-1])].publish(4)
        record = await ctl.move_group(gid, target)
        assert record.handover_seq == (("c0", 4),)
        assert record.source == source and record.target == target
        with pytest.raises(ValueError, match="already on"):
            await ctl.move_group(gid, target)
        with pytest.raises(KeyError, match="unknown worker 'worker-9'"):
            await ctl.move_group(gid, "worker-9")

    run(scenario())


def test_groups_wait_for_a_home_that_has_not_started_within_the_grace() -> None:
    ctl, fakes, clock = setup(2, 4, startup_grace_s=5)
    fakes[1].mode = "hang"
    run(ctl.step())
    assert ctl.placement == {}  # waits: not every worker answered, grace not over
    clock.t += 6
    run(ctl.step())
    assert set(ctl.placement) == set(ctl.home) and set(ctl.placement.values()) == {"worker-0"}


def test_first_leases_start_at_lease_size_times_unix_seconds() -> None:
    fakes = [FakeWorker("worker-0")]
    ctl = ClusterControl(make_cfg(1, 2), fakes, Clock(), wall=lambda: 1_800_000_000.7)
    run(ctl.step())
    assert {s.next_seq for s in fakes[0].book.states()} == {LEASE * 1_800_000_000}


def test_a_stuck_pipeline_counts_as_missed_polls() -> None:
    ctl, fakes, _ = setup(2, 4, misses_to_fail=2)

    async def scenario() -> None:
        await ctl.step()
        fakes[0].mode = "stuck"
        await ctl.step()
        assert ctl.placement == ctl.home
        await ctl.step()

    run(scenario())
    assert set(ctl.placement.values()) == {"worker-1"}
