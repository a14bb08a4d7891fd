"""Overflow on the daemon side: full queues hand frames to an overflow sink (counted apart from drops), and a guest
pipeline processes another runtime's frames against the camera's borrowed state exactly as the home would, without
touching the home's state. Real model, real vtest JPEGs, real runtimes (CPU path)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import CameraConfig, Config
from daemon.delta.policy import CameraDeltaState
from daemon.features.state import from_bytes, to_bytes
from daemon.framequeue import FrameQueues, Item
from daemon.gpu.ipc import PeerAccessError, SharedArrays, export_host, from_json, read_shared, to_json
from daemon.guest import BorrowedState, GuestProcessor, borrow, borrow_host_arrays, lendable
from daemon.sources.replay import ReplaySource
from daemon.types import EndOfStream, Frame, FrameResult
from tests.runtime_helpers import ResultCollector, vtest_jpegs

WARM = 6  # frames the home sees before it lends its state


def _frame(cam: str, seq: int, jpeg: bytes = b"x") -> Frame:
    return Frame(cam, seq, time.time(), time.monotonic(), jpeg=jpeg)


@pytest.mark.parametrize(("sink_answer", "overflowed", "dropped"), [(True, 2, 0), (False, 0, 2), (None, 0, 2)])
def test_full_queue_offers_the_oldest_frame_to_the_overflow_sink(sink_answer: bool | None, overflowed: int,
                                                                 dropped: int) -> None:
    q = FrameQueues()
    q.add_camera("c", 2)
    taken: list[int] = []

    def sink(f: Frame) -> bool:
        if sink_answer is None:
            raise RuntimeError("sink broke")
        taken.append(f.seq)
        return sink_answer

    q.set_overflow(sink)
    for s in range(4):
        q.put(_frame("c", s))
    c = q.counters("c")
    assert (c.put, c.overflowed, c.dropped) == (4, overflowed, dropped)
    assert taken == ([0, 1] if sink_answer is not None else [])  # the oldest frames, in order
    assert [i.seq for i in q.take(10, 0.1)] == [2, 3]
    q.set_overflow(None)
    for s in range(4, 7):
        q.put(_frame("c", s))
    assert q.counters("c").dropped == dropped + 1


def test_end_of_stream_is_never_offered() -> None:
    q = FrameQueues()
    q.add_camera("c", 1)
    offered: list[Item] = []
    q.set_overflow(lambda f: offered.append(f) is None)
    q.put(EndOfStream("c", "done"))
    q.put(_frame("c", 1))
    assert offered == []  # the end marker is not a frame: it stays queued, the frame joins it
    assert [type(i).__name__ for i in q.take(5, 0.1)] == ["EndOfStream", "Frame"]


def test_host_route_round_trip_and_peer_route_refused_in_the_exporting_process() -> None:
    sig = np.arange(80 * 80, dtype=np.uint8).reshape(80, 80)
    feat = np.linspace(0, 1, 2 * 5 * 7, dtype=np.float16).reshape(2, 5, 7)
    shared = export_host([("signature", sig), ("features.0", feat)])
    back = read_shared(from_json(json.loads(json.dumps(to_json(shared)))))
    assert np.array_equal(back[0], sig) and np.array_equal(back[1], feat) and back[1].dtype == np.float16
    fake = SharedArrays("peer", shared.specs, 0, shared.pid, b"\0" * 64)
    with pytest.raises(PeerAccessError, match="process that exported it"):
        read_shared(fake)


@pytest.fixture(scope="module")
def engine(cpu_engine: EngineChoice) -> EngineChoice:
    return cpu_engine


def warm_home(tmp: Path, model_path: Path, vtest_path: Path, engine: EngineChoice, extra: int,
              cameras: Sequence[str] = ()) -> Iterator[tuple[Runtime, Config, list[bytes]]]:
    """A home runtime that has seen ``WARM`` vtest frames of each camera (``cameras``, else _config's one), so
    every camera has a reference to lend; yields it with its config and ``extra`` further frames, stops it after."""
    jpegs = vtest_jpegs(vtest_path, WARM + extra)
    cfg = _config(model_path, tmp)
    if cameras:
        one = cfg.model_dump()
        cfg = Config.model_validate({**one, "cameras": [{**one["cameras"][0], "id": c} for c in cameras]})
    rt, _ = _run_home(cfg, engine, jpegs[:WARM], tmp)
    yield rt, cfg, jpegs[WARM:]
    rt.stop(10.0)


def _config(model: Path, frames_dir: Path) -> Config:
    return Config.model_validate({
        "node": {"site": "s", "area": "a", "line": "l", "node": "n"},
        "model": {"path": str(model), "threads": 1},
        "delta": {"enabled": True, "keyframe_frames": 1000, "keyframe_s": 3600, "drift_tiles": 1_000_000},
        "batching": {"max_batch": 1, "max_wait_ms": 0},
        "cameras": [{"id": "cam", "source": {"type": "replay", "path": str(frames_dir), "realtime": False}}],
    })


def _run_home(cfg: Config, engine: EngineChoice, jpegs: list[bytes], tmp: Path, state: bytes | None = None,
              ) -> tuple[Runtime, list[FrameResult]]:
    """A home runtime that processes ``jpegs`` one at a time (after importing ``state`` when given)."""
    folder = tmp / f"frames{len(list(tmp.iterdir()))}"
    folder.mkdir()
    for i, j in enumerate(jpegs):
        (folder / f"{i:04d}.jpg").write_bytes(j)
    gate = threading.Event()

    def source(cam: CameraConfig, to: Callable[[Item], object]) -> ReplaySource:
        return ReplaySource(cam.id, folder, lambda item: (gate.wait(30), to(item))[1], loop=False, realtime=False)

    collector = ResultCollector()
    rt = Runtime(cfg, [collector], engine=engine, source_factory=source)
    rt.start()
    if state is not None:
        rt.import_camera("cam", state)
    gate.set()
    deadline = time.monotonic() + 120
    while not rt.all_ended() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.all_ended(), "home runtime did not finish its frames"
    return rt, collector.results


def _same(a: FrameResult, b: FrameResult) -> None:
    assert (a.decision, a.cached, a.inferred_fraction, a.regions) == (b.decision, b.cached, b.inferred_fraction,
                                                                      b.regions)
    assert len(a.detections) == len(b.detections)
    for x, y in zip(sorted(a.detections, key=lambda d: (d.x1, d.y1)), sorted(b.detections, key=lambda d: (d.x1, d.y1)),
                    strict=True):
        assert (x.class_id, x.cached) == (y.class_id, y.cached)
        assert max(abs(x.x1 - y.x1), abs(x.y1 - y.y1), abs(x.x2 - y.x2), abs(x.y2 - y.y2)) < 1e-3
        assert abs(x.score - y.score) < 1e-5


def test_guest_processing_equals_the_homes_own_against_the_same_state(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    """One frame against a lent state, guest vs home (a fresh runtime that imported the same state): the pipeline
    plans a frame before the previous one is resolved, so only a frame's first successor is deterministic."""
    jpegs = vtest_jpegs(vtest_path, WARM + 4)
    cfg = _config(model_path, tmp_path)
    home, _ = _run_home(cfg, engine, jpegs[:WARM], tmp_path)
    try:
        state = home.export_camera("cam")
        ref_before = home.delta.reference_state("cam")[0]
        guest = GuestProcessor(cfg, engine)
        guest.start()
        try:
            frames = [_frame("cam", 100 + k, jpegs[WARM + k]) for k in range(4)]
            chained = guest.process(frames, cfg.cameras, [BorrowedState("cam", state)])
            by_bytes = guest.process(frames[:1], cfg.cameras, [BorrowedState("cam", state)])
            split = guest.process(frames[:1], cfg.cameras, [borrow_host_arrays(from_bytes(state, time.monotonic()))])
            live = guest.process(frames[:1], cfg.cameras, [borrow(home, "cam")])
            cold = guest.process(frames[:1], cfg.cameras, [])
        finally:
            guest.stop()
        ref_after = home.delta.reference_state("cam")[0]
    finally:
        home.stop(10.0)
    assert ref_before is not None and ref_after is not None
    assert np.array_equal(ref_before, ref_after)  # the guest frames did not touch the home's reference
    assert chained.warm == ("cam",) and chained.unfinished == 0 and len(chained.results) == 4
    assert [r.seq for r in chained.results] == [100, 101, 102, 103]
    assert all(r.decision in ("regions", "skip") for r in chained.results), [r.decision for r in chained.results]
    assert cold.results[0].decision == "full" and cold.warm == () and cold.keyframes == 0
    assert chained.keyframes == 0
    # the home, fresh, imports the same state and processes the same frame: the same result
    _, own = _run_home(cfg, engine, jpegs[WARM : WARM + 1], tmp_path, state)
    assert len(own) == 1 and own[0].decision in ("regions", "skip")
    for got in (by_bytes, split, live):
        assert got.warm == ("cam",) and len(got.results) == 1
        _same(got.results[0], own[0])


def test_a_state_lent_with_a_frame_in_flight_is_planned_warm() -> None:
    from daemon.features.state import CameraState

    sig = np.zeros((80, 80), np.uint8)
    state = CameraState("c", sig, (), (), CameraDeltaState(), 1.5, 10.0, 12.0)
    lent = lendable(state)
    assert lent.policy == CameraDeltaState(True, 0, 10.0, 0)
    assert lendable(dataclasses.replace(state, signature=None)).policy == CameraDeltaState()
    assert from_bytes(to_bytes(lent), 20.0).policy.has_reference
