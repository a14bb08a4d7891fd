"""Warm fail-over from checkpoints: the coordinator's bounded store and the worker's checkpointer (table-driven),
spill-over's way back (hysteresis), and the coordinator handing a dead worker's cameras their checkpoints (fake
workers, as in test_cluster_control)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from test_cluster_control import FakeWorker, run, setup

from cluster.cache_transfer import STATE_FORMAT, CacheBlob
from cluster.checkpoint import Checkpointer, CheckpointOffer, CheckpointStore
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
    serial, offers = cp.since(0)
    assert [(o.blob.camera, o.age_s) for o in offers] == [("a", 0.5)]
    assert cp.since(serial) == (serial, ())  # acknowledged
    settled["b"] = True
    cp.run_once()
    _, offers = cp.since(serial)
    assert sorted((o.blob.camera, len(o.blob.data)) for o in offers) == [("a", 2), ("b", 2)]
    hosted.remove("a")
    cp.run_once()
    assert [o.blob.camera for o in cp.since(0)[1]] == ["b"]  # a left this worker: its checkpoint goes
    with pytest.raises(ValueError, match="interval"):
        Checkpointer(export, lambda: hosted, 0.0)


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
    """Offers a checkpoint of every hosted camera with each status (a new serial per call), aged ``age``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.serial = 0
        self.age = 0.2
        self.asked: list[tuple[str, int] | None] = []

    async def status(self, extensions: Mapping[str, int], since: tuple[str, int] | None = None) -> WorkerStatus:
        base = await super().status(extensions, since)
        self.asked.append(since)
        self.serial += 1
        offers = tuple(CheckpointOffer(_blob(c.id, 8, self.name[-1].encode()), self.age, self.serial)
                       for g in self.groups.values() for c in g.cameras) if since is not None else ()
        return WorkerStatus(base.identity, base.started_at, base.groups, base.leases, base.heartbeat_age_s,
                            base.healthy, base.fps, checkpoints=offers, checkpoint_serial=self.serial)


def _ckpt_setup(**coordinator: object) -> tuple[object, list[CheckpointingWorker], object]:
    ctl, fakes, clock = setup(2, 4, **coordinator)
    workers = [CheckpointingWorker(f.name, f.gpu, f.links) for f in fakes]
    ctl._workers = {w.name: type(ctl._workers[w.name])(w) for w in workers}  # type: ignore[attr-defined]
    return ctl, workers, clock


@pytest.mark.parametrize(("interval", "wait_s", "warm"), [
    (2.0, 1.0, True),  # a young checkpoint goes with the grant, with its age
    (2.0, 30.0, False),  # too old (checkpoint_max_age_s 10): cold
    (None, 1.0, False),  # checkpoints off: cold, and none are asked for
])
def test_failover_grants_carry_young_checkpoints(interval: float | None, wait_s: float, warm: bool) -> None:
    ctl, workers, clock = _ckpt_setup(checkpoint_interval_s=interval, checkpoint_max_age_s=10.0)

    async def go() -> None:
        await ctl.step()  # type: ignore[attr-defined]
        await ctl.step()  # type: ignore[attr-defined]  # the first placement's checkpoints come with this poll
        clock.t += wait_s  # type: ignore[attr-defined]
        workers[0].mode = "gone"
        await ctl.step()  # type: ignore[attr-defined]

    run(go())
    victim = workers[0]
    assert victim.asked[0] == (("", 0) if interval else None)  # the first poll knows no instance yet
    if interval:
        assert victim.asked[1] == ("a", 1)  # then acknowledges what it got from that instance
    moves = [m for m in ctl.snapshot().moves if m.reason == "failover"]  # type: ignore[attr-defined]
    assert moves
    for m in moves:
        grant = workers[1].groups[m.group]
        if warm:
            assert [b.data for b in grant.caches] == [b"0" * 8] * len(grant.cameras)  # the dead worker's states
            assert [c for c, _ in m.checkpoints] == [c.id for c in grant.cameras]
            assert all(age == pytest.approx(wait_s + 0.2) for _, age in m.checkpoints)
        else:
            assert grant.caches == () and m.checkpoints == ()


def test_checkpoints_from_a_worker_that_does_not_own_the_camera_are_ignored() -> None:
    ctl, workers, _ = _ckpt_setup()

    async def go() -> None:
        await ctl.step()  # type: ignore[attr-defined]
        stray = next(g for g, w in ctl.placement.items() if w == "worker-0")  # type: ignore[attr-defined]
        workers[1].groups[stray] = workers[0].groups[stray]  # worker-1 wrongly still runs it
        await ctl.step()  # type: ignore[attr-defined]
        cam = workers[0].groups[stray].cameras[0].id
        kept = ctl._checkpoints.get(cam, 1e9, 1e9)  # type: ignore[attr-defined]
        assert kept is not None and kept.data == b"0" * 8

    run(go())
