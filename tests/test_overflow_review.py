"""The overflow review's sequences (the order gate at a camera's release and return, the guest host's locks, the
sender's breaker and deadlines, the config's release budget), on synthetic frames; the GPU parts are mocked only
where a GPU engine would be built."""

from __future__ import annotations

import threading
import time
import types

import pytest

from cluster.config import OverflowSettings, validate_cluster_data
from cluster.messages import OverflowBatch, OverflowStats
from cluster.overflow.device import cuda_ordinal
from tests.test_overflow_order import FakeLink, _frame, _gate, _result, _sender, _wait


def test_settle_does_not_release_results_waiting_for_home_frames_in_the_pipeline() -> None:
    # home took frames 2 and 3 (in its pipeline); frame 4 went to the peer and came back first; then the camera is
    # released: the queue is empty, settle runs while 2 and 3 are still in post
    gate, rec = _gate()
    gate.publish_result(_result("a", 1))
    gate.expect("a", 4, time.monotonic() + 10, after=3)
    assert gate.deliver(_result("a", 4))
    assert not gate.settle(["a"], 0.2)  # 4 is still held: not clean, and not flushed ahead of 2 and 3
    gate.publish_result(_result("a", 2))  # the pipeline finishes 2 and 3 before the fence
    gate.publish_result(_result("a", 3))
    assert [t for _, _, t in rec.out] == [1.0, 2.0, 3.0, 4.0]


def test_settle_waits_for_the_home_frames_then_returns_clean() -> None:
    gate, rec = _gate()
    gate.expect("a", 4, time.monotonic() + 10, after=3)
    assert gate.deliver(_result("a", 4))
    threading.Timer(0.1, lambda: [gate.publish_result(_result("a", s)) for s in (2, 3)]).start()
    t = time.monotonic()
    assert gate.settle(["a"], 5.0)
    assert time.monotonic() - t < 2.0
    assert [t for _, _, t in rec.out] == [2.0, 3.0, 4.0]
    assert gate.home_seen("a") == 3


def test_home_seen_is_forgotten_when_a_camera_moves_away_and_back() -> None:
    # camera a leaves (a straggler result after settle records a high seq), comes back later with a new source
    # whose frame seqs start at 0 again; the host forgets the camera after its fence and again at its assign
    gate, rec = _gate()
    gate.publish_result(_result("a", 500))
    gate.settle(["a"], 0.01)
    gate.publish_result(_result("a", 501))  # straggler from the pipeline, before the fence
    gate.forget(["a"])  # WorkerHost.release after the fence (and assign, for a camera new to the worker)
    rec.out.clear()
    assert gate.home_seen("a") == -1
    gate.expect("a", 4, time.monotonic() + 10, after=3)  # home took 0..3, frame 4 overflowed
    assert gate.deliver(_result("a", 4))  # peer faster than the home
    for s in (2, 3):
        gate.publish_result(_result("a", s))
    assert [t for _, _, t in rec.out] == [2.0, 3.0, 4.0]


def test_forget_gives_up_what_is_still_pending_or_held() -> None:
    gate, rec = _gate()
    gate.expect("a", 4, time.monotonic() + 10, after=3)
    gate.expect("a", 5, time.monotonic() + 10)
    assert gate.deliver(_result("a", 4))
    gate.forget(["a"])
    assert gate.pending("a") == 0 and gate.given_up_of("a") == 2 and rec.out == []
    assert not gate.deliver(_result("a", 5))  # late: discarded


def test_expect_never_waits_for_a_slow_inner_publisher() -> None:
    gate, rec = _gate()
    slow = threading.Event()
    inner_publish = rec.publish_result

    def publish(result: object) -> None:
        slow.wait(2.0)  # an MQTT enqueue waiting for room
        inner_publish(result)  # type: ignore[arg-type]

    rec.publish_result = publish  # type: ignore[method-assign]
    threading.Thread(target=gate.publish_result, args=(_result("b", 1),), daemon=True).start()
    time.sleep(0.1)  # the publishing thread is inside the inner publisher now
    t = time.monotonic()
    gate.expect("a", 7, time.monotonic() + 10)  # the queues' overflow sink, under the frame queues' lock
    gate.publish_result(_result("a", 8))  # held behind 7: queued, no waiting either
    assert time.monotonic() - t < 0.5
    slow.set()
    assert gate.deliver(_result("a", 7))
    _wait(lambda: len(rec.out) == 3)
    assert [(c, t) for c, _, t in rec.out] == [("b", 1.0), ("a", 7.0), ("a", 8.0)]


def test_guest_stats_do_not_wait_for_the_guest_engine_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """status() -> GuestHost.stats() must not wait for a GPU engine build (seconds): the coordinator's 1 s status
    polls would miss and declare the worker dead. A failed build fails later batches at once."""
    import cluster.overflow.guest as g
    import daemon.backend

    builds: list[float] = []

    def slow_build(model: object, max_batch: int) -> object:  # a GPU engine: ORT session, cudnn search, warm-up
        builds.append(time.monotonic())
        time.sleep(1.5)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(daemon.backend, "build_engine", slow_build)
    rt = types.SimpleNamespace(engine_choice=types.SimpleNamespace(gpu_decoder=object()),
                               cfg=types.SimpleNamespace(model=None, batching=types.SimpleNamespace(max_batch=8)))
    metrics = types.SimpleNamespace(overflow=lambda *a, **k: None, round_trip=lambda *a: None,
                                    guest_frames=lambda *a: None, guest_latency=lambda *a: None)
    host = g.GuestHost("w", rt, OverflowSettings(enabled=True), metrics)  # type: ignore[arg-type]
    host.prepare()
    _wait(lambda: bool(builds))
    done = threading.Event()
    threading.Thread(target=lambda: (host.stats(OverflowStats()), done.set()), daemon=True).start()
    assert done.wait(1.0), "stats() blocked while the guest engine builds"
    batch = OverflowBatch("worker-0", (), (), ())
    with pytest.raises(RuntimeError, match="out of memory"):
        host.process(batch)  # waits for the build in progress, which fails
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="could not be built"):
        host.process(batch)
    assert time.monotonic() - t < 0.5 and len(builds) == 1  # no rebuild per batch


def test_a_failing_peer_opens_the_breaker_then_one_batch_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.overflow.sender as sender_mod

    monkeypatch.setattr(sender_mod, "BREAKER_OPEN_S", 0.5)
    link = FakeLink(fail=True)
    sender, gate, _rec, _ = _sender(link, max_batch=1, max_wait_ms=0, timeout_ms=200)
    try:
        for s in range(3):
            assert sender.offer(_frame(s))
            _wait(lambda s=s: len(link.batches) == s + 1 and gate.pending() == 0)
        time.sleep(0.05)
        assert not sender.offer(_frame(3))  # open: dropped at once, not held for a deadline
        assert sender.counts()["refused"] == 1 and sender.counts()["failed"] == 3
        time.sleep(0.6)
        link.fail = False
        assert sender.offer(_frame(4))  # the probe
        _wait(lambda: sender.counts()["returned"] == 1)
        assert sender.offer(_frame(5))  # closed again
    finally:
        sender.stop(2.0)


def test_frames_whose_deadline_passed_are_not_sent() -> None:
    link = FakeLink(delay=0.4)
    sender, gate, _rec, _ = _sender(link, max_batch=1, max_wait_ms=0, timeout_ms=100)
    try:
        for s in range(4):
            assert sender.offer(_frame(s))
        _wait(lambda: gate.pending() == 0, 3.0)
        time.sleep(0.5)
    finally:
        sender.stop(2.0)
    assert len(link.batches) == 1  # the others expired while the first call was out: given up, not sent
    assert gate.given_up == 4


@pytest.mark.parametrize(("changes", "message"), [
    ({"overflow": {"enabled": True, "timeout_ms": 8000}}, "coordinator.move_timeout_s = 10 is too short"),
    ({"overflow": {"enabled": True, "max_batch": 16, "max_pending": 8}}, "max_pending = 8 is below max_batch = 16"),
])
def test_overflow_settings_that_cannot_work_are_refused(changes: dict[str, object], message: str) -> None:
    data = {
        "node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"}, "model": {"path": "m.onnx"}},
        "groups": [{"id": "g", "cameras": [{"id": "c", "source": {"type": "replay", "path": "builtin:vtest"}}]}],
        "workers": {"count": 2, **changes},
    }
    with pytest.raises(Exception, match=message):
        validate_cluster_data(data, "<test>")
    ok = {**data, "workers": {"count": 2, "overflow": {"enabled": True}}}
    validate_cluster_data(ok, "<test>")


@pytest.mark.parametrize(("gpu", "visible", "ordinal"), [(3, "3,5", 0), (5, "3,5", 1), (1, "", 1), (None, "", None),
                                                         (2, "0,1", 2)])
def test_ray_gpu_ids_map_to_cuda_ordinals(gpu: int | None, visible: str, ordinal: int | None) -> None:
    assert cuda_ordinal(gpu, visible) == ordinal

