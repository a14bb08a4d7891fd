"""Warm fail-over from checkpoints: the coordinator's bounded store and the worker's checkpointer (table-driven),
spill-over's way back (hysteresis), and the coordinator handing a dead worker's cameras their checkpoints (fake
workers, as in test_cluster_control)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from test_cluster_control import FakeWorker, run, setup

from cluster.cache_transfer import STATE_FORMAT, CacheBlob
from cluster.checkpoint import (
    CheckpointCollector,
    Checkpointer,
    CheckpointInfo,
    CheckpointOffer,
    CheckpointStore,
    Pending,
    fetch_plan,
)
from cluster.config import validate_cluster_data
from cluster.messages import WorkerStatus
from cluster.placement import spill_may_return


def _blob(camera: str, size: int, tag: bytes = b"x") -> CacheBlob:
    return CacheBlob(camera, STATE_FORMAT, tag * size, size, "w")


# (puts as (camera, size, taken_at)), then (camera -> expected age at now=100 with max age 10, or None), bytes kept
@pytest.mark.parametrize(("puts", "expect", "kept_bytes", "refused", "evicted"), [
    ([("a", 10, 95.0)], {"a": 5.0}, 10, 0, 0),
    ([("a", 10, 85.0)], {"a": None}, 10, 0, 0),  # older than the max age: not offered (a keyframe instead)
    ([("a", 10, 95.0), ("a", 20, 97.0)], {"a": 3.0}, 20, 0, 0),  # a newer one replaces
    ([("a", 10, 97.0), ("a", 20, 95.0)], {"a": 3.0}, 10, 0, 0),  # a late, older one does not
    ([("a", 40, 93.0), ("b", 40, 94.0), ("c", 40, 95.0)], {"a": None, "b": 6.0, "c": 5.0}, 80, 0, 1),  # > 100 B

    ([("a", 30, 99.0), ("b", 51, 99.0)], {"a": 1.0, "b": None}, 30, 1, 0),  # above the per-state bound
    ([("a", 10, 101.0)], {"a": 0.0}, 10, 0, 0),  # clock skew: never a negative age
    ([], {"a": None}, 0, 0, 0),
])
def test_checkpoint_store(puts: list[tuple[str, int, float]], expect: dict[str, float | None], kept_bytes: int,
                          refused: int, evicted: int) -> None:
    store = CheckpointStore(max_bytes=100, max_item_bytes=50)
    for cam, size, at in puts:
        store.put(_blob(cam, size), at, "w")
    got = {cam: store.get(cam, 100.0, 10.0) for cam in expect}
    assert {c: (None if b is None else b.age_s) for c, b in got.items()} == expect
    assert (store.bytes, store.refused, store.evicted) == (kept_bytes, refused, evicted)


def test_checkpoint_store_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="max_item_bytes <= max_bytes"):
        CheckpointStore(10, 20)


def test_checkpointer_keeps_the_latest_settled_state_per_hosted_camera() -> None:
    now = [0.0]
    hosted = ["a", "b"]
    settled = {"a": True, "b": False}
    versions = {"a": 0, "b": 0}

    def export(cam: str) -> CacheBlob | None:
        versions[cam] += 1
        return _blob(cam, versions[cam]) if settled[cam] else None

    cp = Checkpointer(export, lambda: hosted, 1.0, clock=lambda: now[0])
    assert cp.run_once() == 1 and cp.unsettled == 1  # b had a frame in flight: nothing kept for it
    now[0] = 0.5
    assert cp.infos() == (CheckpointInfo("a", 1, 0.5, 1),)  # described, not carried
    assert [(o.blob.camera, o.age_s, o.serial) for o in cp.fetch(["a", "b"], 100)] == [("a", 0.5, 1)]
    settled["b"] = True
    cp.run_once()
    assert [(i.camera, i.version, i.nbytes) for i in cp.infos()] == [("a", 2, 2), ("b", 3, 2)]
    assert [o.blob.camera for o in cp.fetch(["b", "a"], 3)] == ["b"]  # in the order asked, within the bytes
    assert cp.fetch(["a"], 1) == ()  # nothing fits: nothing comes
    hosted.remove("a")
    cp.run_once()
    assert [i.camera for i in cp.infos()] == ["b"]  # a left this worker: its checkpoint goes
    with pytest.raises(ValueError, match="interval"):
        Checkpointer(export, lambda: hosted, 0.0)


def _info(worker: str, camera: str, nbytes: int, version: int = 1) -> Pending:
    return Pending(worker, f"{worker}-i", CheckpointInfo(camera, version, 0.1, nbytes))


# pending checkpoints, ages of the kept ones, budget -> the plan as {worker: cameras}
@pytest.mark.parametrize(("pending", "kept", "budget", "plan"), [
    ([], {}, 100, {}),
    ([_info("w0", "a", 40), _info("w0", "b", 40)], {}, 100, {"w0": ["a", "b"]}),
    # over the budget: the rest waits for a later round (a smaller one behind a big one still goes)
    ([_info("w0", "a", 60), _info("w0", "b", 60), _info("w1", "c", 30)], {}, 100, {"w0": ["a"], "w1": ["c"]}),
    # cameras without a kept checkpoint first, then the stalest kept ones
    ([_info("w0", "a", 60), _info("w0", "b", 60), _info("w1", "c", 60)], {"a": 1.0, "c": 3.0}, 100, {"w0": ["b"]}),
    ([_info("w0", "a", 60), _info("w1", "c", 60)], {"a": 1.0, "c": 3.0}, 100, {"w1": ["c"]}),
    ([_info("w0", "a", 50), _info("w1", "c", 50)], {"a": 1.0, "c": 3.0}, 100, {"w0": ["a"], "w1": ["c"]}),
    ([_info("w0", "a", 101)], {}, 100, {}),  # never above the budget
])
def test_fetch_plan(pending: list[Pending], kept: dict[str, float], budget: int, plan: dict[str, list[str]]) -> None:
    got = fetch_plan(pending, kept, budget)
    assert {w: [i.camera for i in infos] for (w, _), infos in got.items()} == plan
    assert sum(i.nbytes for infos in got.values() for i in infos) <= budget


def test_collector_fetches_each_version_once_from_its_instance_and_refuses_oversized_ones() -> None:
    store = CheckpointStore(max_bytes=1000, max_item_bytes=100)
    col = CheckpointCollector(store, budget=200)
    col.offered("w0", "i1", [CheckpointInfo("a", 3, 0.1, 10), CheckpointInfo("big", 4, 0.1, 101)])
    assert store.refused == 1  # never fetched: it could not be kept
    assert {w: [i.camera for i in v] for (w, _), v in col.plan(0.0).items()} == {"w0": ["a"]}
    assert col.received("w0", "i1", [CheckpointOffer(_blob("a", 10), 0.5, 3)], lambda c: True, 10.0) == 10
    col.offered("w0", "i1", [CheckpointInfo("a", 3, 0.1, 10)])
    assert col.plan(10.0) == {}  # that version is in
    col.offered("w0", "i2", [CheckpointInfo("a", 1, 0.1, 10)])  # a replaced replica counts from 1 again
    assert list(col.plan(10.0)) == [("w0", "i2")]
    col.withdraw("w0")
    assert col.plan(10.0) == {}
    assert col.received("w1", "j", [CheckpointOffer(_blob("a", 20), 0.0, 9)], lambda c: False, 11.0) == 0  # not its
    assert store.get("a", 10.0, 10.0) is not None and store.get("a", 10.0, 10.0).age_s == pytest.approx(0.5)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="budget"):
        CheckpointCollector(store, budget=50)


@pytest.mark.parametrize(("spilled_at", "now", "pressure", "measured_at", "may"), [
    (100.0, 200.0, 0.0, 150.0, True),  # held long enough, the home is calm over a window after the spill
    (100.0, 150.0, 0.0, 140.0, False),  # not held long enough (hold 60 s)
    (100.0, 200.0, 0.03, 150.0, False),  # home still drops more than the return bound (0.02)
    (100.0, 200.0, 0.02, 150.0, True),  # at the bound
    (100.0, 200.0, 0.0, 90.0, False),  # the calm window ended before the spill: not a fresh reading
    (100.0, 200.0, None, None, False),  # no reading at all
])
def test_spill_may_return(spilled_at: float, now: float, pressure: float | None, measured_at: float | None,
                          may: bool) -> None:
    assert spill_may_return(spilled_at, now, 60.0, pressure, measured_at, 0.02) is may


def test_spill_return_bound_defaults_below_the_spill_bound_and_is_checked() -> None:
    base = {"node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"}},
            "groups": [{"id": "g", "cameras": [{"id": "c", "source": {"type": "replay", "path": "builtin:vtest"}}]}],
            "workers": {"count": 1}}
    cfg = validate_cluster_data({**base, "coordinator": {"spill_drop_fraction": 0.2}})
    assert cfg.coordinator.spill_return == pytest.approx(0.05)
    with pytest.raises(Exception, match=r"spill_return_fraction 0\.3 must be below spill_drop_fraction 0\.2"):
        validate_cluster_data({**base, "coordinator": {"spill_drop_fraction": 0.2, "spill_return_fraction": 0.3}})


class CheckpointingWorker(FakeWorker):
    """Describes a checkpoint of every hosted camera with each status (version bumped by ``take``) and hands its
    bytes out with ``checkpoints``; ``fetch_mode``: ok | fail | hang."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.versions: dict[str, int] = {}
        self.age = 0.2
        self.size = 8
        self.fetch_mode = "ok"
        self.fetches: list[tuple[list[str], int]] = []

    def take(self) -> None:
        for g in self.groups.values():
            for c in g.cameras:
                self.versions[c.id] = self.versions.get(c.id, 0) + 1

    def data(self, camera: str, version: int | None = None) -> bytes:
        return f"{self.name}:{version or self.versions[camera]}".encode().ljust(self.size, b".")

    def _hosted(self) -> dict[str, int]:
        cams = {c.id for g in self.groups.values() for c in g.cameras}
        return {c: v for c, v in sorted(self.versions.items()) if c in cams}

    async def status(self, extensions: Mapping[str, int]) -> WorkerStatus:
        base = await super().status(extensions)
        infos = tuple(CheckpointInfo(c, v, self.age, self.size) for c, v in self._hosted().items())
        return replace(base, checkpoints=infos)

    async def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        self.fetches.append((list(cameras), max_bytes))
        await self._gate()
        if self.fetch_mode == "fail":
            raise RuntimeError("fetch failed")
        if self.fetch_mode == "hang":
            await asyncio.sleep(5)
        hosted, out, total = self._hosted(), [], 0
        for cam in cameras:
            if cam in hosted and total + self.size <= max_bytes:
                total += self.size
                out.append(CheckpointOffer(CacheBlob(cam, STATE_FORMAT, self.data(cam), self.size, self.name),
                                           self.age, hosted[cam]))
        return tuple(out)


def _ckpt_setup(**coordinator: object) -> tuple[Any, list[CheckpointingWorker], Any]:
    ctl, fakes, clock = setup(2, 4, **coordinator)
    workers = [CheckpointingWorker(f.name, f.gpu, f.links) for f in fakes]
    ctl._workers = {w.name: type(ctl._workers[w.name])(w) for w in workers}
    return ctl, workers, clock


async def _placed_and_checkpointed(ctl: Any, workers: list[CheckpointingWorker]) -> None:
    await ctl.step()  # placement
    for w in workers:
        w.take()
    await ctl.step()  # the descriptors come with this poll
    assert await ctl.fetch_checkpoints() > 0


def _failover_grants(ctl: Any, workers: list[CheckpointingWorker]) -> list[tuple[Any, Any]]:
    moves = [m for m in ctl.snapshot().moves if m.reason == "failover"]
    assert moves
    return [(m, workers[1].groups[m.group]) for m in moves]


@pytest.mark.parametrize(("interval", "wait_s", "warm"), [
    (2.0, 1.0, True),  # a young checkpoint goes with the grant, with its age
    (2.0, 30.0, False),  # too old (checkpoint_max_age_s 10): cold
])
def test_failover_grants_carry_young_checkpoints(interval: float | None, wait_s: float, warm: bool) -> None:
    ctl, workers, clock = _ckpt_setup(checkpoint_interval_s=interval, checkpoint_max_age_s=10.0)

    async def go() -> None:
        await _placed_and_checkpointed(ctl, workers)
        clock.t += wait_s
        workers[0].mode = "gone"
        await ctl.step()

    run(go())
    for m, grant in _failover_grants(ctl, workers):
        if warm:
            assert [b.data for b in grant.caches] == [workers[0].data(c.id) for c in grant.cameras]
            assert [c for c, _ in m.checkpoints] == [c.id for c in grant.cameras]
            assert all(age == pytest.approx(wait_s + 0.2) for _, age in m.checkpoints)
        else:
            assert grant.caches == () and m.checkpoints == ()


@pytest.mark.parametrize(("second", "version"), [
    ("ok", 2),  # the newer version was fetched: it goes with the grant
    ("fail", 1),  # the fetch of the newer one failed: the previous checkpoint stays and is used
])
def test_failover_uses_the_latest_fetched_checkpoint(second: str, version: int) -> None:
    ctl, workers, clock = _ckpt_setup()
    victim = workers[0]

    async def go() -> None:
        await _placed_and_checkpointed(ctl, workers)
        clock.t += 1.0
        victim.take()
        await ctl.step()
        victim.fetch_mode = second
        await ctl.fetch_checkpoints()
        victim.mode = "gone"
        await ctl.step()

    run(go())
    for _, grant in _failover_grants(ctl, workers):
        assert [b.data for b in grant.caches] == [victim.data(c.id, version) for c in grant.cameras]
    assert ctl._metrics.sink.total("deltayolo_checkpoint_fetches_total", outcome="failed") == (second == "fail")


def test_a_hanging_fetch_blocks_neither_the_liveness_poll_nor_the_failover() -> None:
    ctl, workers, _ = _ckpt_setup(checkpoint_fetch_timeout_s=0.5)
    victim = workers[0]

    async def go() -> tuple[float, bool, int]:
        await _placed_and_checkpointed(ctl, workers)
        victim.take()
        await ctl.step()
        victim.fetch_mode = "hang"
        asked = len(victim.fetches)
        fetch = asyncio.create_task(ctl.fetch_checkpoints())
        while len(victim.fetches) == asked:  # until the fetch call is out (then it hangs)
            await asyncio.sleep(0.001)
        victim.mode = "gone"
        began = time.perf_counter()
        await ctl.step()  # polls, declares the victim dead and fails over while its fetch hangs
        step_s = time.perf_counter() - began
        pending = not fetch.done()
        return step_s, pending, await fetch

    step_s, pending, kept = run(go())
    assert pending and step_s < 0.4  # the fetch (0.5 s timeout, 5 s hang) was still out
    assert kept == 0
    for _, grant in _failover_grants(ctl, workers):  # warm from the checkpoint fetched before
        assert [b.data for b in grant.caches] == [victim.data(c.id, 1) for c in grant.cameras]


def test_fetch_rounds_stay_within_their_byte_budget() -> None:
    """Large states: a round fetches at most checkpoint_fetch_bytes; the rest comes in later rounds."""
    ctl, workers, _ = _ckpt_setup(checkpoint_max_state_bytes=3 << 20, checkpoint_fetch_bytes=7 << 20)
    for w in workers:
        w.size = 3 << 20

    async def go() -> list[int]:
        await ctl.step()
        for w in workers:
            w.take()
        await ctl.step()
        return [await ctl.fetch_checkpoints() for _ in range(3)]

    rounds = run(go())
    assert rounds == [6 << 20, 6 << 20, 0]  # 4 cameras of 3 MiB: two a round, then nothing new
    assert len(ctl._checkpoints) == 4
    assert all(max_bytes <= 7 << 20 for w in workers for _, max_bytes in w.fetches)


@pytest.mark.parametrize(("interval", "fetched"), [(2.0, True), (None, False)])
def test_run_fetches_on_a_loop_of_its_own_only_with_checkpoints_on(interval: float | None, fetched: bool) -> None:
    ctl, workers, _ = _ckpt_setup(checkpoint_interval_s=interval, poll_interval_s=0.05,
                                  checkpoint_fetch_interval_s=0.05)

    async def go() -> None:
        await ctl.step()
        for w in workers:
            w.take()
        stop = asyncio.Event()
        task = asyncio.create_task(ctl.run(stop))
        await asyncio.sleep(0.4)
        stop.set()
        await asyncio.wait_for(task, 2.0)

    run(go())
    assert any(w.fetches for w in workers) is fetched
    assert (len(ctl._checkpoints) == 4) is fetched


def test_checkpoints_from_a_worker_that_does_not_own_the_camera_are_ignored() -> None:
    ctl, workers, _ = _ckpt_setup()

    async def go() -> None:
        await ctl.step()
        stray = next(g for g, w in ctl.placement.items() if w == "worker-0")
        workers[1].groups[stray] = workers[0].groups[stray]  # worker-1 wrongly still runs it
        for w in workers:
            w.take()
        await ctl.step()
        await ctl.fetch_checkpoints()
        cam = workers[0].groups[stray].cameras[0].id
        kept = ctl._checkpoints.get(cam, 1e9, 1e9)
        assert kept is not None and kept.data == workers[0].data(cam)
        assert all(cam not in cams for cams, _ in workers[1].fetches)

    run(go())


@pytest.mark.parametrize(("coordinator", "message"), [
    ({"checkpoint_max_state_bytes": 1 << 20, "checkpoint_fetch_bytes": 1 << 19},
     r"checkpoint_fetch_bytes 524288 is below checkpoint_max_state_bytes 1048576: such a state could never be "
     r"fetched"),
    ({"spill_cycle_window_s": 600, "spill_calm_s": 300},
     r"spill_cycle_window_s 600 must be below spill_calm_s 300"),
])
def test_fetch_and_spill_backoff_bounds_are_checked(coordinator: dict[str, object], message: str) -> None:
    base = {"node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"}},
            "groups": [{"id": "g", "cameras": [{"id": "c", "source": {"type": "replay", "path": "builtin:vtest"}}]}],
            "workers": {"count": 1}}
    with pytest.raises(Exception, match=message):
        validate_cluster_data({**base, "coordinator": coordinator})
