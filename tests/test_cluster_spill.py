"""Spill-over to NVLink peers: the pure planner (table-driven) and the coordinator acting on workers' drop
counters (fake workers, as in test_cluster_control)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest
from test_cluster_control import FakeWorker, run, setup

from cluster.messages import CameraStatus, GroupGrant, WorkerStatus
from cluster.placement import drop_pressure, spill_backoff, spill_decay, spill_moves


@pytest.mark.parametrize(("before", "after", "share"), [
    ({}, {}, 0.0),
    ({"a": (100, 0)}, {"a": (190, 10)}, 0.1),  # 90 processed, 10 dropped
    ({"a": (100, 0)}, {"a": (100, 0), "b": (30, 10)}, 0.25),  # a camera that appeared counts from zero
    ({"a": (500, 50)}, {"a": (20, 0)}, 0.0),  # counters went back (camera restarted): fresh
    ({"a": (0, 0), "b": (0, 0)}, {"a": (50, 50), "b": (100, 0)}, 0.25),
])
def test_drop_pressure(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], share: float) -> None:
    assert drop_pressure(before, after) == pytest.approx(share)


SPILL = {"w0": ("w2",), "w2": ("w0",), "w1": ("w3",), "w3": ("w1",)}  # two NVLink islands: 0+2, 1+3


@pytest.mark.parametrize(("pressure", "held", "spill", "moves"), [
    # saturated w0 hands its lightest group to its idle NVLink peer w2 (never to w1: PCIe only)
    ({"w0": 0.2, "w1": 0.0, "w2": 0.0, "w3": 0.0}, {"w0": {"g0": 2, "g1": 1}}, SPILL, [("g1", "w0", "w2")]),
    # the peer is busy too: no spill (the GPU sheds load by dropping frames)
    ({"w0": 0.2, "w1": 0.0, "w2": 0.03, "w3": 0.0}, {"w0": {"g0": 2, "g1": 1}}, SPILL, []),
    # below the saturation bound: nothing moves
    ({"w0": 0.04, "w2": 0.0}, {"w0": {"g0": 1, "g1": 1}}, SPILL, []),
    # a single group is never spilled (moving it only moves the problem)
    ({"w0": 0.5, "w2": 0.0}, {"w0": {"g0": 1}}, SPILL, []),
    # no NVLink peers at all: no spill
    ({"w0": 0.5, "w1": 0.0}, {"w0": {"g0": 1, "g1": 1}}, {"w0": (), "w1": ()}, []),
    # two saturated GPUs, one idle peer each; ties broken by name; most pressed first
    ({"w0": 0.1, "w1": 0.3, "w2": 0.0, "w3": 0.0}, {"w0": {"a": 1, "b": 1}, "w1": {"c": 3, "d": 1}}, SPILL,
     [("d", "w1", "w3"), ("a", "w0", "w2")]),
    # one peer for two saturated GPUs (an island of three): it takes one group this step
    ({"w0": 0.3, "w1": 0.2, "w2": 0.0}, {"w0": {"a": 1, "b": 1}, "w1": {"c": 1, "d": 1}},
     {"w0": ("w2", "w1"), "w1": ("w2", "w0"), "w2": ("w0", "w1")}, [("a", "w0", "w2")]),
    # a peer that is not live (no pressure reading) is not a target
    ({"w0": 0.3}, {"w0": {"a": 1, "b": 1}}, SPILL, []),
])
def test_spill_moves(pressure: dict[str, float], held: dict[str, dict[str, float]],
                     spill: dict[str, tuple[str, ...]], moves: list[tuple[str, str, str]]) -> None:
    assert spill_moves(pressure, held, spill, saturated=0.05, room=0.01) == moves


def test_spill_moves_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="room < saturated"):
        spill_moves({}, {}, {}, saturated=0.01, room=0.05)


class DroppingWorker(FakeWorker):
    """Reports per-camera (processed, dropped) counters that grow as ``publish`` and ``drop`` say."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.counts: dict[str, tuple[int, int]] = {}

    async def assign(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        for g in grants:  # a camera added to a runtime starts with fresh counters (daemon.framequeue)
            if g.group not in self.groups:
                for cam in g.cameras:
                    self.counts.pop(cam.id, None)
        return await super().assign(grants)

    def load(self, processed: int, dropped: int) -> None:
        for g in self.groups.values():
            for cam in g.cameras:
                p, d = self.counts.get(cam.id, (0, 0))
                self.counts[cam.id] = (p + processed, d + dropped)

    async def status(self, extensions: Mapping[str, int]) -> WorkerStatus:
        base = await super().status(extensions)
        cams = tuple(CameraStatus(c, True, "streaming", *self.counts.get(c, (0, 0)))
                     for g in self.groups.values() for c in (cam.id for cam in g.cameras))
        return WorkerStatus(base.identity, base.started_at, base.groups, base.leases, base.heartbeat_age_s,
                            base.healthy, base.fps, cams)


def _setup(links: bool, **coordinator: object) -> tuple[object, list[DroppingWorker], object]:
    ctl, fakes, clock = setup(4, 8, links=links, spill_drop_fraction=0.1, spill_window_s=1.0, load_factor=1.0,
                              **coordinator)
    workers = [DroppingWorker(f.name, f.gpu, f.links) for f in fakes]
    ctl._workers = {w.name: type(ctl._workers[w.name])(w) for w in workers}  # type: ignore[attr-defined]
    return ctl, workers, clock


@pytest.mark.parametrize("links", [True, False])
def test_coordinator_spills_a_saturated_gpu_to_its_nvlink_peer(links: bool) -> None:
    ctl, workers, clock = _setup(links)

    async def go() -> None:
        await ctl.step()  # type: ignore[attr-defined]
        before = {w.name: set(w.groups) for w in workers}
        assert all(len(g) == 2 for g in before.values())
        for w in workers:
            w.load(100, 40 if w.name == "worker-0" else 0)
        clock.t += 0.5  # type: ignore[attr-defined]
        await ctl.step()  # type: ignore[attr-defined]
        for w in workers:
            w.load(100, 40 if w.name == "worker-0" else 0)
        clock.t += 1.0  # type: ignore[attr-defined]
        await ctl.step()  # type: ignore[attr-defined]
        moves = [m for m in ctl.snapshot().moves if m.reason == "spill"]  # type: ignore[attr-defined]
        if links:  # GPU 0's NVLink peer is GPU 2 (islands 0+2, 1+3), not the next index
            assert [(m.source, m.target) for m in moves] == [("worker-0", "worker-2")]
            assert len(workers[0].groups) == 1 and len(workers[2].groups) == 3
        else:
            assert moves == [] and len(workers[0].groups) == 2

    run(go())


def test_spilled_group_comes_back_once_held_and_its_home_is_calm() -> None:
    """Hysteresis: the group stays on the peer for spill_hold_s, and while its home still drops frames."""
    ctl, workers, clock = _setup(True, spill_hold_s=5.0)

    async def tick(home_drops: int) -> None:
        for w in workers:
            w.load(100, home_drops if w.name == "worker-0" else 0)
        clock.t += 1.0  # type: ignore[attr-defined]
        await ctl.step()  # type: ignore[attr-defined]

    async def go() -> list[str]:
        await ctl.step()  # type: ignore[attr-defined]
        await tick(40)
        await tick(40)
        (spilled,) = [m.group for m in ctl.snapshot().moves if m.reason == "spill"]  # type: ignore[attr-defined]
        for _ in range(6):  # past the hold, but the home still drops 3 %: above the return bound (10 % / 4)
            await tick(3)
        assert ctl.placement[spilled] == "worker-2"  # type: ignore[attr-defined]
        for _ in range(2):  # calm for a whole window: back home
            await tick(0)
        assert ctl.placement[spilled] == "worker-0"  # type: ignore[attr-defined]
        return [m.reason for m in ctl.snapshot().moves]  # type: ignore[attr-defined]

    assert run(go()) == ["spill", "unspill"]


# factor at the last return, returned at (None: never came back), now -> (hold factor, cycle); window 60 s,
# calm 1000 s, cap 8
@pytest.mark.parametrize(("factor", "returned_at", "now", "expect"), [
    (1, None, 500.0, (1, False)),  # a first spill
    (1, 100.0, 130.0, (2, True)),  # spilled again 30 s after it came home: a cycle doubles the hold
    (2, 100.0, 160.0, (4, True)),  # at the window's end still a cycle
    (4, 100.0, 150.0, (8, True)),
    (8, 100.0, 150.0, (8, True)),  # capped
    (4, 100.0, 161.0, (4, False)),  # after the window: no cycle, no decay yet
    (4, 100.0, 1100.0, (2, False)),  # home a whole calm period: halved
    (8, 100.0, 2100.0, (2, False)),  # two calm periods: a quarter
    (8, 100.0, 1e9, (1, False)),  # never below 1
    (16, None, 0.0, (8, False)),  # a factor above a lowered cap is capped
])
def test_spill_backoff(factor: int, returned_at: float | None, now: float, expect: tuple[int, bool]) -> None:
    assert spill_backoff(factor, returned_at, now, 60.0, 1000.0, 8) == expect


@pytest.mark.parametrize(("factor", "home_s", "decayed"), [
    (8, 0.0, 8), (8, 999.0, 8), (8, 1000.0, 4), (8, 3000.0, 1), (1, 5000.0, 1), (8, -5.0, 8),
])
def test_spill_decay(factor: int, home_s: float, decayed: int) -> None:
    assert spill_decay(factor, home_s, 1000.0) == decayed


def test_spill_backoff_checks_its_bounds() -> None:
    with pytest.raises(ValueError, match="cap must be >= 1"):
        spill_backoff(1, None, 0.0, 1.0, 2.0, 0)
    with pytest.raises(ValueError, match="calm period must be > 0"):
        spill_decay(1, 0.0, 0.0)


def test_a_group_that_bounces_under_steady_overload_is_held_longer_each_cycle() -> None:
    """Spill, return, spill again at once: each cycle doubles the hold (counted and logged); a long calm stay
    home decays it again."""
    ctl, workers, clock = _setup(True, spill_hold_s=5.0, spill_cycle_window_s=10.0, spill_calm_s=30.0,
                                 spill_backoff_max=4)
    ctl = cast(Any, ctl)
    moves: list[tuple[str, float]] = []

    async def tick(home_drops: int) -> None:
        for w in workers:
            w.load(100, home_drops if w.name == "worker-0" else 0)
        clock.t += 1.0  # type: ignore[attr-defined]
        await ctl.step()
        moves.extend((m.reason, clock.t) for m in ctl.snapshot().moves[len(moves):])  # type: ignore[attr-defined]

    async def until(reason: str, home_drops: int, limit: int) -> float:
        seen = sum(1 for r, _ in moves if r == reason)
        for _ in range(limit):
            await tick(home_drops)
            if sum(1 for r, _ in moves if r == reason) > seen:
                return moves[-1][1]
        raise AssertionError(f"no {reason} within {limit} ticks: {moves}")

    async def go() -> list[float]:
        await ctl.step()
        stays = []
        for _ in range(4):  # the home is overloaded again right after each return
            spilled = await until("spill", 40, 10)
            stays.append(await until("unspill", 0, 60) - spilled)
        await until("spill", 40, 10)  # the fifth spill: a cycle, still capped at 4x
        await until("unspill", 0, 60)
        for _ in range(35):  # calm at home for more than spill_calm_s: the backoff decays
            await tick(0)
        spilled = await until("spill", 40, 10)
        stays.append(await until("unspill", 0, 60) - spilled)
        return stays

    stays = run(go())
    print(f"\nseconds on the peer per spill: {stays}")
    # base hold 5 s (+1-2 s for a calm window after it); then 2x, 4x, 4x (capped); after the calm stay 2x
    assert [round(s / 5.0) for s in stays] == [1, 2, 4, 4, 2], stays
    assert all(s >= h * 5.0 for s, h in zip(stays, [1, 2, 4, 4, 2], strict=True))
    groups = {m.group for m in ctl.snapshot().moves}
    assert len(groups) == 1  # always the same (lightest) group
    sink = ctl._metrics.sink
    assert sink.total("deltayolo_spill_cycles_total") == 4  # spills 2-5; the last one came after a calm stay
    assert ctl._spill.cycles() == 4
