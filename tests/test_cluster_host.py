"""WorkerHost (what a worker replica runs) in-process: the real model on replayed vtest cameras, JSONL output.

A group runs on one host, is released with its exact next seq and continues on another host without a gap in
the numbering; results are counted in the metrics; the health check follows the pipeline heartbeat.
"""

from __future__ import annotations

import json
import os
import pickle
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.cache_transfer import STATE_FORMAT, CacheBlob, CacheRoute
from cluster.checkpoint import CheckpointStore
from cluster.config import HotSettings, NodeTemplate
from cluster.host import WorkerHost, WorkerUnhealthy
from cluster.messages import GroupGrant, WorkerIdentity
from cluster.metrics import MemorySink, WorkerMetrics
from cluster.sequence import Lease
from daemon.backend import EngineChoice, build_engine
from daemon.config.model import CameraConfig, ModelConfig, Thresholds
from daemon.features import state as st


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[EngineChoice]:
    choice = build_engine(ModelConfig(path=str(model_path), threads=1), 4)
    yield choice
    choice.engine.close()


def _template(model_path: Path, out: Path, delta: bool = True, **delta_settings: object) -> NodeTemplate:
    return NodeTemplate.model_validate({
        "node": {"site": "s", "area": "a", "line": "l", "node": "n"},
        "model": {"path": str(model_path), "threads": 1},
        "delta": {"enabled": delta, **delta_settings},
        "batching": {"max_batch": 4, "max_wait_ms": 10},
        "outputs": {"jsonl": {"path": str(out / "{worker}.jsonl"), "include_stats": False}},
        "stats": {"interval_s": 0.5},
    })


def _cameras(vtest: Path, n: int) -> tuple[CameraConfig, ...]:
    return tuple(CameraConfig.model_validate(
        {"id": f"cam{i}", "source": {"type": "replay", "path": str(vtest), "fps": 5, "loop": True}}) for i in range(n))


def _host(name: str, template: NodeTemplate, engine: EngineChoice, max_age: float = 10.0,
          checkpoint_s: float | None = None, sink: MemorySink | None = None) -> WorkerHost:
    ident = WorkerIdentity(name, f"{name}-1", "local", None, os.getpid())
    return WorkerHost(ident, template, max_age, WorkerMetrics(name, sink or MemorySink()), engine=engine,
                      checkpoint_interval_s=checkpoint_s)


def _seqs(path: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["kind"] == "detections":
                out.setdefault(rec["camera"], []).append(rec["seq"])
    return out


def _wait_for(path: Path, cams: int, each: int, timeout: float = 30.0) -> dict[str, list[int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seqs = _seqs(path)
        if len(seqs) == cams and all(len(v) >= each for v in seqs.values()):
            return seqs
        time.sleep(0.2)
    raise TimeoutError(f"{path}: fewer than {each} messages per camera after {timeout} s: {_seqs(path)}")


def test_group_moves_between_hosts_with_contiguous_numbering(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    template = _template(model_path, tmp_path)
    a, b = _host("worker-0", template, engine), _host("worker-1", template, engine)
    a.start()
    b.start()
    try:
        cams = _cameras(vtest_path, 2)
        leases = tuple(Lease(c.id, 0, 1000) for c in cams)
        assert a.assign([GroupGrant("g", cams, leases)]) == ("g",)
        _wait_for(tmp_path / "worker-0.jsonl", 2, 3)
        a.check_health()
        (handoff,) = a.release(["g"], "peer")
        # warm: each camera's state (signature, cached boxes, policy) left with the handoff as DYCS v1 bytes
        assert a.status().groups == () and sorted(c.camera for c in handoff.caches) == ["cam0", "cam1"]
        assert {c.format for c in handoff.caches} == {"dycs-v1"} and all(c.data[:4] == b"DYCS" for c in handoff.caches)
        next_leases = tuple(Lease(s.camera, s.next_seq, s.ceiling) for s in handoff.leases)
        b.assign([GroupGrant("g", cams, next_leases, caches=handoff.caches, reason="rebalance")])
        _wait_for(tmp_path / "worker-1.jsonl", 2, 3)
        status = b.status()
        assert status.groups == ("g",) and status.healthy and dict(status.cache_moves) == {
            "cold": 0, "warm": 2, "failover_cold": 0, "failover_warm": 0}
    finally:
        assert a.stop(10.0)
        assert b.stop(10.0)
    first, second = _seqs(tmp_path / "worker-0.jsonl"), _seqs(tmp_path / "worker-1.jsonl")
    for state in handoff.leases:
        cam = state.camera
        assert first[cam] == list(range(state.next_seq))  # every message of the first host, in order
        assert second[cam] == list(range(state.next_seq, state.next_seq + len(second[cam])))  # continues exactly


def test_idle_host_is_healthy_and_a_stale_heartbeat_is_not(
    tmp_path: Path, model_path: Path, engine: EngineChoice
) -> None:
    template = _template(model_path, tmp_path)
    host = _host("worker-0", template, engine)
    with pytest.raises(WorkerUnhealthy, match="runtime not running"):
        host.check_health()
    host.start()
    try:
        time.sleep(0.3)
        host.check_health()  # no camera: the pipeline still beats
        assert host.status().healthy
    finally:
        host.stop(5.0)
    strict = _host("worker-1", template, engine, max_age=1e-9)
    strict.start()
    try:
        time.sleep(0.2)
        with pytest.raises(WorkerUnhealthy, match=r"heartbeat is .* old"):
            strict.check_health()
    finally:
        strict.stop(5.0)


def test_metrics_count_published_frames_and_decisions(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    template = _template(model_path, tmp_path)
    sink = MemorySink()
    host = WorkerHost(WorkerIdentity("worker-0", "x", "local", None, os.getpid()), template, 10.0,
                      WorkerMetrics("worker-0", sink), engine=engine)
    host.start()
    try:
        cams = _cameras(vtest_path, 1)
        host.assign([GroupGrant("g", cams, (Lease("cam0", 0, 1000),))])
        seqs = _wait_for(tmp_path / "worker-0.jsonl", 1, 4)
    finally:
        host.stop(10.0)
    seqs = _seqs(tmp_path / "worker-0.jsonl")
    frames = sink.total("deltayolo_frames_total", camera="cam0")
    assert frames == len(seqs["cam0"]) >= 4
    decisions = sum(sink.total("deltayolo_delta_decisions_total", decision=d) for d in ("full", "regions", "skip"))
    assert decisions == frames
    assert sink.total("deltayolo_delta_decisions_total", decision="full") >= 1  # the first frame is a keyframe
    assert len(sink.observations["deltayolo_latency_ms"]) == frames


def test_hot_thresholds_apply_without_restarting_cameras(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    template = _template(model_path, tmp_path, delta=False)  # with delta on, cached boxes wait for a keyframe
    host = _host("worker-0", template, engine)
    host.start()
    try:
        host.assign([GroupGrant("g", _cameras(vtest_path, 1), (Lease("cam0", 0, 1000),))])
        _wait_for(tmp_path / "worker-0.jsonl", 1, 3)
        host.reconfigure(HotSettings(thresholds=Thresholds(confidence=0.85)))
        (state,) = host.lease_states()
        _wait_for(tmp_path / "worker-0.jsonl", 1, state.next_seq + 4)
    finally:
        host.stop(10.0)
    scores_after = [
        box["score"]
        for line in (tmp_path / "worker-0.jsonl").read_text().splitlines()
        if (rec := json.loads(line))["kind"] == "detections" and rec["seq"] > state.next_seq + 1
        for box in rec["boxes"]
    ]
    assert scores_after and min(scores_after) >= 0.85
    states = [json.loads(line) for line in (tmp_path / "worker-0.jsonl").read_text().splitlines()]
    assert not any(r["kind"] == "camera_state" and r["state"] == "removed" for r in states)  # updated in place




def _records(path: Path) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "detections":
            out.setdefault(rec["camera"], []).append(rec)
    return out


def _other_model(blob: CacheBlob) -> CacheBlob:
    """The same camera state, as if made by another model."""
    state = st.from_bytes(blob.data, 0.0)
    return replace(blob, data=st.to_bytes(replace(state, model_sha256="0" * 64)))


def test_dead_hosts_cameras_start_warm_from_checkpoints_else_cold(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    """Warm fail-over: the first host checkpoints its cameras and dies (nothing exported at the end); the second
    starts cam0 from its checkpoint (not a keyframe) and cam1, whose checkpoint came from another model, cold."""
    template = _template(model_path, tmp_path, keyframe_frames=100_000, keyframe_s=3600, drift_tiles=1_000_000)
    sink = MemorySink()
    a = _host("worker-0", template, engine, checkpoint_s=0.3)
    b = _host("worker-1", template, engine, sink=sink)
    store = CheckpointStore(1 << 24, 1 << 22)
    a.start()
    b.start()
    try:
        cams = _cameras(vtest_path, 2)
        a.assign([GroupGrant("g", cams, tuple(Lease(c.id, 0, 1000) for c in cams))])
        _wait_for(tmp_path / "worker-0.jsonl", 2, 4)
        deadline = time.monotonic() + 20
        while len(store) < 2:
            assert time.monotonic() < deadline, "no checkpoint of both cameras"
            infos = a.status().checkpoints  # described with the status; the bytes come with a call of their own
            for offer in a.checkpoints([i.camera for i in infos], 1 << 24):
                store.put(offer.blob, time.monotonic() - offer.age_s, "worker-0")
            time.sleep(0.1)
        assert a.stop(10.0)  # the "death": no hand-over
        time.sleep(0.5)
        warm, other = store.get("cam0", time.monotonic(), 10.0), store.get("cam1", time.monotonic(), 10.0)
        assert warm is not None and other is not None and warm.age_s >= 0.5
        leases = tuple(Lease(c.id, 1000, 2000) for c in cams)
        t = time.monotonic()
        b.assign([GroupGrant("g", cams, leases, (warm, _other_model(other)), "failover")])
        assign_s = time.monotonic() - t
        _wait_for(tmp_path / "worker-1.jsonl", 2, 3)
        status = b.status()
    finally:
        a.stop(10.0)
        b.stop(10.0)
    moves = dict(status.cache_moves)
    assert (moves["failover_warm"], moves["failover_cold"]) == (1, 1)
    assert sink.total("deltayolo_failovers_total", kind="warm") == 1
    assert sink.total("deltayolo_failovers_total", kind="cold") == 1
    assert sink.observations["deltayolo_failover_checkpoint_age_ms"][0] >= 500
    first = {cam: recs[0] for cam, recs in _records(tmp_path / "worker-1.jsonl").items()}
    print(f"\nfail-over assign {assign_s * 1000:.0f} ms; first frames: "
          f"{ {c: (r['decision'], r['seq']) for c, r in first.items()} }")
    assert first["cam0"]["seq"] == first["cam1"]["seq"] == 1000
    assert first["cam1"]["decision"] == "full"  # cold: a forced keyframe
    assert first["cam0"]["decision"] != "full"  # warm: no keyframe


class BigCheckpoints:
    """A CacheTransfer whose checkpoints are as large as a features-mode camera's state (about 2.9 MB: 16 cameras
    make the ~46 MB the review measured), each camera's different; moves are cold."""

    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes

    def export_camera(self, camera: str, route: CacheRoute) -> CacheBlob | None:
        return None

    def import_camera(self, blob: CacheBlob) -> bool:
        return False

    def checkpoint(self, camera: str) -> CacheBlob | None:
        data = camera.encode().ljust(self._nbytes, b"\x01")
        return CacheBlob(camera, STATE_FORMAT, data, len(data), "worker-0")


def test_status_stays_small_and_fast_while_checkpoints_are_large(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    """16 cameras with ~2.9 MB checkpoints each: the liveness status describes them in a few KB; their bytes come
    only with ``checkpoints``, bounded per call."""
    size, cams = 2_900_000, 16
    ident = WorkerIdentity("worker-0", "worker-0-1", "local", None, os.getpid())
    host = WorkerHost(ident, _template(model_path, tmp_path), 10.0, WorkerMetrics("worker-0", MemorySink()),
                      engine=engine, checkpoint_interval_s=0.5, cache_transfer=lambda rt: BigCheckpoints(size))
    cameras = tuple(CameraConfig.model_validate(
        {"id": f"cam{i}", "source": {"type": "replay", "path": str(vtest_path), "fps": 0.5, "loop": True}})
        for i in range(cams))
    host.start()
    try:
        host.assign([GroupGrant("g", cameras, tuple(Lease(c.id, 0, 1000) for c in cameras))])
        deadline = time.monotonic() + 20
        while len(host.status().checkpoints) < cams:
            assert time.monotonic() < deadline, "no checkpoint of every camera"
            time.sleep(0.1)
        timings, payloads = [], []
        for _ in range(20):
            t = time.perf_counter()
            payloads.append(len(pickle.dumps(host.status())))
            timings.append(time.perf_counter() - t)
        status = host.status()
        t = time.perf_counter()
        fetched = host.checkpoints([c.id for c in cameras], 8 << 20)
        fetch_bytes = len(pickle.dumps(fetched))
        fetch_s = time.perf_counter() - t
    finally:
        host.stop(10.0)
    described = sum(i.nbytes for i in status.checkpoints)
    print(f"\nstatus {max(payloads)} B pickled, p50 {1000 * statistics.median(timings):.2f} ms, max "
          f"{1000 * max(timings):.2f} ms (checkpoints described: {described} B); one fetch of 8 MiB at most: "
          f"{len(fetched)} states, {fetch_bytes} B pickled in {1000 * fetch_s:.1f} ms")
    assert described == cams * size and {i.camera for i in status.checkpoints} == {c.id for c in cameras}
    assert max(payloads) < 64 << 10  # a few KB, not the ~46 MB the states weigh
    assert statistics.median(timings) < 0.05
    assert [o.blob.camera for o in fetched] == ["cam0", "cam1"] and fetch_bytes < (8 << 20) + (64 << 10)
    versions = {i.camera: i.version for i in status.checkpoints}
    assert all(o.serial >= versions[o.blob.camera] for o in fetched)  # the latest, never an older one
