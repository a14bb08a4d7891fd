"""Overflow batching and ordering (cluster/overflow/), the peer choice (cluster/placement.py) and the config
section, on synthetic frames: results of a camera go out in frame order across frames handed to the peer, nothing
is published twice, a peer that fails or is too slow costs the frames it had and nothing else."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from cluster.config import OverflowSettings, validate_cluster_data
from cluster.messages import OverflowBatch, OverflowReply
from cluster.metrics import MemorySink, WorkerMetrics
from cluster.overflow import OrderGate, OverflowSender
from cluster.placement import GpuSite, overflow_peer, partners
from cluster.sequence import Lease, SeqBook, SequencedPublisher
from daemon.config.model import CameraConfig
from daemon.guest import BorrowedState
from daemon.publish import NullPublisher
from daemon.types import Frame, FrameError, FrameResult, StageTimes


class Recorder(NullPublisher):
    def __init__(self) -> None:
        self.out: list[tuple[str, int, float]] = []  # camera, published seq, capture_time (the frame's seq here)
        self.lock = threading.Lock()

    def publish_result(self, result: FrameResult) -> None:
        with self.lock:
            self.out.append((result.camera, result.seq, result.capture_time))

    def publish_error(self, err: FrameError) -> None:
        with self.lock:
            self.out.append((err.camera, err.seq, -1.0))


def _result(cam: str, seq: int, decision: str = "skip") -> FrameResult:
    return FrameResult(camera=cam, seq=seq, capture_time=float(seq), capture_mono=time.monotonic(), width=4, height=4,
                       detections=(), bytes_in=1, bytes_decoded=1, cached=True, cache_age_s=0.0,
                       times=StageTimes(0.0, 0.0, 0.0, 0.0), decision=decision)


def _gate() -> tuple[OrderGate, Recorder]:
    rec = Recorder()
    book = SeqBook()
    for cam in ("a", "b"):
        book.grant(Lease(cam, 1000, 2000))
    return OrderGate(SequencedPublisher([rec], book)), rec


def test_results_wait_for_earlier_overflow_frames_and_go_out_in_frame_order() -> None:
    gate, rec = _gate()
    gate.publish_result(_result("a", 1))
    gate.expect("a", 2, time.monotonic() + 10)
    gate.expect("a", 4, time.monotonic() + 10)
    for s in (3, 5):
        gate.publish_result(_result("a", s))
    gate.publish_result(_result("b", 9))  # another camera is not held
    assert [(c, t) for c, _, t in rec.out] == [("a", 1.0), ("b", 9.0)]
    assert gate.deliver(_result("a", 4))  # 4 is back, 2 is not: 3, 4, 5 still wait
    assert len(rec.out) == 2
    assert gate.deliver(_result("a", 2))
    a = [(q, t) for c, q, t in rec.out if c == "a"]
    assert [t for _, t in a] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [q for q, _ in a] == list(range(1000, 1005))  # numbered after ordering: contiguous
    assert not gate.deliver(_result("a", 2))  # a second answer for the same frame is not published again
    assert gate.late == 1 and gate.pending() == 0


def test_a_returned_result_waits_for_the_homes_earlier_frames_still_in_its_pipeline() -> None:
    gate, rec = _gate()
    gate.publish_result(_result("a", 1))
    gate.expect("a", 4, time.monotonic() + 10, after=3)  # frames 2 and 3 were taken by the home's pipeline
    assert gate.deliver(_result("a", 4))  # the peer was faster than the home
    assert [t for _, _, t in rec.out] == [1.0]
    gate.publish_result(_result("a", 2))
    assert [t for _, _, t in rec.out] == [1.0, 2.0]
    gate.publish_result(_result("a", 3))
    gate.publish_result(_result("a", 5))
    assert [t for _, _, t in rec.out] == [1.0, 2.0, 3.0, 4.0, 5.0]
    gate.expect("a", 7, time.monotonic() + 10, after=6)  # the home's frame 6 is lost in its pipeline
    assert gate.deliver(_result("a", 7))
    assert gate.expire(time.monotonic() + 20) == 0 and [t for _, _, t in rec.out][-1] == 7.0  # its deadline


def test_given_up_frames_release_the_held_results_and_late_answers_are_discarded() -> None:
    gate, rec = _gate()
    now = time.monotonic()
    gate.expect("a", 1, now + 0.05)
    gate.expect("a", 2, now + 10)
    gate.publish_result(_result("a", 3))
    assert gate.expire(now + 0.1) == 1  # frame 1 given up; 2 still pending: 3 waits
    assert rec.out == []
    assert gate.give_up("a", 2) and not gate.give_up("a", 2)
    assert [t for _, _, t in rec.out] == [3.0]
    assert not gate.deliver(_result("a", 1))
    assert (gate.late, gate.given_up, gate.given_up_of("a"), gate.given_up_of("b")) == (1, 2, 2, 0)


def test_settle_waits_for_the_pending_frames_of_released_cameras() -> None:
    gate, rec = _gate()
    gate.expect("a", 1, time.monotonic() + 10)
    gate.publish_result(_result("a", 2))
    threading.Timer(0.1, lambda: gate.deliver(_result("a", 1))).start()
    t = time.monotonic()
    assert gate.settle(["a"], 5.0)
    assert time.monotonic() - t < 2.0
    assert [t for _, _, t in rec.out] == [1.0, 2.0]
    gate.expect("a", 7, time.monotonic() + 10)
    gate.publish_result(_result("a", 8))
    assert not gate.settle(["a"], 0.05)  # never answered: given up, the held result goes out
    assert [t for _, _, t in rec.out][-1] == 8.0


class FakeLink:
    """A peer that answers each batch after ``delay`` s with a result per frame (or fails)."""

    def __init__(self, delay: float = 0.0, fail: bool = False, answer: Callable[[Frame], bool] = lambda f: True):
        self.name = "worker-1"
        self.delay = delay
        self.fail = fail
        self.answer = answer
        self.batches: list[OverflowBatch] = []

    def call(self, batch: OverflowBatch, timeout_s: float) -> OverflowReply:
        self.batches.append(batch)
        time.sleep(self.delay)
        if self.fail:
            raise ConnectionError("peer is gone")
        return OverflowReply("worker-1", tuple(_result(f.camera, f.seq, "regions") for f in batch.frames
                                               if self.answer(f)), warm=("a",))


def _sender(link: FakeLink | None, **kw: float) -> tuple[OverflowSender, OrderGate, Recorder, MemorySink]:
    gate, rec = _gate()
    settings = OverflowSettings(enabled=True, max_batch=int(kw.get("max_batch", 4)),
                                max_wait_ms=kw.get("max_wait_ms", 20), timeout_ms=kw.get("timeout_ms", 500),
                                max_pending=int(kw.get("max_pending", 16)))
    cam = CameraConfig.model_validate({"id": "a", "source": {"type": "replay", "path": "builtin:vtest"}})
    sink = MemorySink()
    sender = OverflowSender("worker-0", settings, gate, lambda c: BorrowedState(c, b""),
                            lambda c: cam if c == "a" else None, WorkerMetrics("worker-0", sink))
    sender.set_peer(link)
    sender.start()
    return sender, gate, rec, sink


def _frame(seq: int) -> Frame:
    return Frame("a", seq, float(seq), time.monotonic(), jpeg=b"\xff\xd8")


def _drive(sender: OverflowSender, gate: OrderGate, frames: range, every: int = 3) -> None:
    """Every ``every``-th frame overflows to the peer, the others are the home's own results."""
    for s in frames:
        if s % every == 0:
            assert sender.offer(_frame(s))
        else:
            gate.publish_result(_result("a", s))


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_sender_batches_overflow_frames_and_the_home_publishes_everything_in_order() -> None:
    link = FakeLink(delay=0.02)
    sender, gate, rec, sink = _sender(link, max_batch=4, max_wait_ms=30, max_pending=64)
    try:
        _drive(sender, gate, range(60))
        _wait(lambda: len(rec.out) == 60)
    finally:
        sender.stop(2.0)
    assert [t for _, _, t in rec.out] == [float(s) for s in range(60)]
    assert [q for _, q, _ in rec.out] == list(range(1000, 1060))
    assert all(1 <= len(b.frames) <= 4 for b in link.batches) and sum(len(b.frames) for b in link.batches) == 20
    assert all(b.states == (BorrowedState("a", b""),) and [c.id for c in b.cameras] == ["a"] for b in link.batches)
    c = sender.counts()
    assert (c["sent"], c["returned"], c["failed"], c["given_up"]) == (20, 20, 0, 0)
    assert sink.total("deltayolo_overflow_frames_total", outcome="returned") == 20
    assert len(sink.observations["deltayolo_overflow_round_trip_ms"]) == len(link.batches)


@pytest.mark.parametrize("case", ["failing", "slow", "partial", "absent"])
def test_a_failing_slow_or_absent_peer_costs_only_its_frames(case: str) -> None:
    link = {"failing": FakeLink(fail=True), "slow": FakeLink(delay=0.3),
            "partial": FakeLink(answer=lambda f: f.seq % 2 == 0), "absent": None}[case]
    sender, gate, rec, _ = _sender(link, max_batch=2, max_wait_ms=5, timeout_ms=50)
    try:
        if link is None:
            for s in range(30):
                (gate.publish_result(_result("a", s)) if s % 3 else None) if s % 3 else \
                    pytest.fail("offered") if sender.offer(_frame(s)) else None
        else:
            _drive(sender, gate, range(30))
        _wait(lambda: len(rec.out) >= 20 and gate.pending() == 0, 10.0)
        time.sleep(0.4)  # the slow peer's late answers arrive: discarded
    finally:
        sender.stop(2.0)
    published = [t for _, _, t in rec.out]
    assert published == sorted(published) and len(set(published)) == len(published)
    assert [q for _, q, _ in rec.out] == list(range(1000, 1000 + len(published)))  # numbers contiguous
    own = {float(s) for s in range(30) if s % 3}
    assert own <= set(published)  # the home's own results all went out
    c = sender.counts()
    if case == "partial":
        assert set(published) - own == {float(s) for s in range(0, 30, 6)}
        assert c["failed"] == 5 and gate.given_up == 5
    elif case == "absent":
        assert c["refused"] == 10 and c["sent"] == 0 and set(published) == own
    else:
        assert set(published) == own and gate.given_up == 10
        assert (c["late"] > 0) if case == "slow" else (c["failed"] == 10)


def test_offers_beyond_max_pending_are_refused() -> None:
    link = FakeLink(delay=0.5)
    sender, *_ = _sender(link, max_batch=1, max_wait_ms=0, timeout_ms=2000, max_pending=3)
    try:
        taken = [sender.offer(_frame(s)) for s in range(10)]
    finally:
        sender.stop(2.0)
    assert sum(taken) == 3 and sender.counts()["refused"] == 7


def test_overflow_peer_is_the_first_live_nvlink_peer() -> None:
    sites = [GpuSite("w0", "n", 0, 0), GpuSite("w1", "n", 1, 0), GpuSite("w2", "n", 2, 0), GpuSite("w3", "n", 3, None),
             GpuSite("w4", "m", 0, 0)]
    pts = partners(sites)
    live = {"w0", "w1", "w2", "w3", "w4"}
    table = [  # worker, dead, peer_only, expected
        ("w0", set(), True, "w1"), ("w1", set(), True, "w2"), ("w2", set(), True, "w0"),
        ("w0", {"w1"}, True, "w2"), ("w0", {"w1", "w2"}, True, None), ("w0", {"w1", "w2"}, False, "w3"),
        ("w3", set(), True, None), ("w3", set(), False, "w0"), ("w4", set(), True, None),
    ]
    for worker, dead, peer_only, want in table:
        got = overflow_peer(worker, pts[worker], lambda n, d=dead: n in live - d, peer_only)  # type: ignore[misc]
        assert got == want, (worker, dead, peer_only)


def test_overflow_config_section() -> None:
    base = {"node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"}},
            "groups": [{"id": "g", "cameras": [{"id": "c", "source": {"type": "replay", "path": "builtin:vtest"}}]}],
            "workers": {"count": 1}}
    assert validate_cluster_data(base).workers.overflow == OverflowSettings()
    on = validate_cluster_data({**base, "workers": {"count": 1, "overflow": {
        "enabled": True, "max_batch": 4, "max_wait_ms": 10, "route": "peer", "all_devices_visible": True}}})
    assert on.workers.overflow.enabled and on.workers.overflow.route == "peer"
    from daemon.config.loader import ConfigError

    with pytest.raises(ConfigError, match="max_batch"):
        validate_cluster_data({**base, "workers": {"count": 1, "overflow": {"max_batch": 0}}})
    with pytest.raises(ConfigError, match="route"):
        validate_cluster_data({**base, "workers": {"count": 1, "overflow": {"route": "pcie"}}})
    with pytest.raises(ConfigError, match="needs all_devices_visible true"):
        validate_cluster_data({**base, "workers": {"count": 1, "overflow": {"route": "peer"}}})
