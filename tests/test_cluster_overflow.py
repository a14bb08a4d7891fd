"""Overflow batches on a real local Ray (fake GPU slots), 2 workers over replayed vtest cameras.

The home worker hosts a camera replayed at 60 frames/s with a frame queue of 1 on a 2-core box shared with the
other worker: it cannot keep up, its queue overflows. With ``workers.overflow`` on, the overflow frames go to the
other worker (its peer: ``peer_only: false``, as fake GPUs have no NVLink) with the camera's borrowed state; the peer
processes them as a guest (warm: REGIONS / SKIP, not FULL) and returns the results, which the home publishes in
capture order with contiguous numbers (no gap, no duplicate). Then the peer is killed: the home keeps publishing and
drops its overflow frames instead (counted), still in order.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI") and importlib.util.find_spec("ray") is None:
    raise RuntimeError("CI must run the cluster tests: install the `cluster` extra (ray[serve]==2.60.0)")
ray = pytest.importorskip("ray")

from ray import serve  # noqa: E402
from ray_local import local_ray  # noqa: E402

from cluster import sharding  # noqa: E402
from cluster.app import build_from_config  # noqa: E402
from cluster.config import validate_cluster_data  # noqa: E402
from cluster.messages import ClusterStatus, WorkerStatus  # noqa: E402

LEASE = 100_000


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[int]:
    """A local Ray with 2 CPUs and 2 fake GPU slots; yields the port of its Prometheus metrics endpoint."""
    with local_ray() as port:
        yield port


def _groups() -> tuple[str, str]:
    """A group that shards to worker-0 and one that shards to worker-1."""
    for a, b in itertools.permutations([f"g{i}" for i in range(32)], 2):
        if sharding.assign({a: 1.0, b: 1.0}, ["worker-0", "worker-1"], 1.25) == {a: "worker-0", b: "worker-1"}:
            return a, b
    raise AssertionError("no group names with that placement")


def _cluster(out: Path, model: Path, vtest: Path) -> dict[str, Any]:
    hot, calm = _groups()

    def cam(cid: str, fps: float, queue: int) -> dict[str, Any]:
        return {"id": cid, "queue_size": queue, "source": {"type": "replay", "path": str(vtest), "fps": fps,
                                                          "loop": True}}

    return {
        "node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"},
                 "model": {"path": str(model), "threads": 1},
                 "delta": {"enabled": True, "keyframe_frames": 100_000, "keyframe_s": 3600, "drift_tiles": 1_000_000},
                 "batching": {"max_batch": 4, "max_wait_ms": 5},
                 "outputs": {"jsonl": {"path": str(out / "{worker}.jsonl"), "include_stats": False}},
                 "stats": {"interval_s": 0.5}},
        "groups": [{"id": hot, "cameras": [cam("hot", 60.0, 1)]}, {"id": calm, "cameras": [cam("calm", 2.0, 2)]}],
        "workers": {"count": 2, "num_cpus": 0.5, "health_check_period_s": 1, "health_check_timeout_s": 10,
                    "overflow": {"enabled": True, "max_batch": 4, "max_wait_ms": 20, "timeout_ms": 3000,
                                 "max_pending": 8, "peer_only": False}},
        "coordinator": {"poll_interval_s": 0.25, "call_timeout_s": 1.0, "misses_to_fail": 2, "seq_lease": LEASE,
                        "rebalance_after_s": None, "startup_grace_s": 60, "checkpoint_interval_s": None},
    }


def _wait(handle: Any, check: Any, timeout: float, what: str) -> ClusterStatus:
    deadline = time.monotonic() + timeout
    while True:
        snap: ClusterStatus = handle.status.remote().result(timeout_s=30)
        if check(snap):
            return snap
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s: placement {snap.placement}")
        time.sleep(0.25)


def _status(snap: ClusterStatus, worker: str) -> WorkerStatus:
    return next(s for s in snap.statuses if s.identity.worker == worker)


def _hot_messages(path: Path) -> list[tuple[int, float, float]]:
    """The hot camera's (seq, capture_time, publish_time) in publishing order."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "detections" and rec["camera"] == "hot":
            out.append((int(rec["seq"]), float(rec["capture_time"]), float(rec["publish_time"])))
    return out


def _in_order(msgs: list[tuple[int, float, float]]) -> None:
    seqs = [m[0] for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a gap or a duplicate in the hot camera's numbers"
    captures = [m[1] for m in msgs]
    assert all(b > a for a, b in itertools.pairwise(captures)), "the hot camera's frames went out of capture order"


def _metrics(port: int, wanted: tuple[str, ...], timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = str(resp.read().decode())
        if all(w in text for w in wanted):
            return text
        time.sleep(1.0)
    raise AssertionError(f"metrics {[w for w in wanted if w not in text]} not exported within {timeout} s")


@pytest.mark.slow
def test_overflow_frames_go_to_the_peer_warm_and_come_back_in_order_then_drop_without_it(
    ray_cluster: int, tmp_path: Path, model_path: Path, vtest_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = validate_cluster_data(_cluster(out, model_path, vtest_path))
    hot, calm = _groups()
    handle = serve.run(build_from_config(cfg), name="overflow", route_prefix=None)
    try:
        _wait(handle, lambda s: dict(s.placement) == {hot: "worker-0", calm: "worker-1"}, 120, "placement")
        snap = _wait(handle, lambda s: dict(_status(s, "worker-0").overflow.counts).get("returned", 0) >= 20
                     and _status(s, "worker-0").overflow.peer == "worker-1", 90, "20 overflow frames returned")
        time.sleep(3)
        snap = handle.status.remote().result(timeout_s=30)
        home, peer = _status(snap, "worker-0"), _status(snap, "worker-1")
        victim = peer.identity.actor_name
        assert victim
        home_counts = dict(home.overflow.counts)
        hot_cam = next(c for c in home.cameras if c.camera == "hot")
        metrics = _metrics(ray_cluster, ("ray_deltayolo_overflow_frames_total", 'outcome="returned"',
                                         "ray_deltayolo_overflow_guest_frames_total",
                                         "ray_deltayolo_overflow_round_trip_ms_bucket",
                                         "ray_deltayolo_overflow_guest_ms_bucket"))
        killed_at = time.time()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        dead = _wait(handle, lambda s: dict(s.placement).get(calm) == "worker-0", 15, "fail-over of the peer's group")
        time.sleep(3)
        after = _status(handle.status.remote().result(timeout_s=30), "worker-0")
    finally:
        serve.delete("overflow")
    print(f"\nhome overflow before the kill {home_counts}; hot camera processed {hot_cam.processed} overflowed "
          f"{hot_cam.overflowed} dropped {hot_cam.dropped}; guest frames {peer.overflow.guest_frames} decisions "
          f"{dict(peer.overflow.guest_decisions)} cold {peer.overflow.guest_cold} keyframes "
          f"{peer.overflow.guest_keyframes}; after the kill "
          f"{dict(after.overflow.counts)} peer {after.overflow.peer}")
    # the peer processed overflow frames warm: it read the borrowed caches (no FULL on warm frames)
    decisions = dict(peer.overflow.guest_decisions)
    # (cold: frames lent before the home planned its first frame, so without a reference: one batch at most)
    assert peer.overflow.guest_frames >= 20 and peer.overflow.guest_cold <= cfg.workers.overflow.max_batch
    # no warm frame went FULL for want of a reference (keyframes are scheduled out of the way here); FULL frames
    # the content asks for (regions covering most of the frame: the peer sees frames further apart) stay rare
    assert peer.overflow.guest_keyframes == 0
    assert decisions.get("regions", 0) + decisions.get("skip", 0) >= max(20, 9 * decisions.get("full", 0))
    assert home_counts["sent"] >= home_counts["returned"] >= 20 and hot_cam.overflowed >= home_counts["sent"]
    assert 'worker="worker-1"' in metrics
    # the home published its own and the returned results in capture order, numbers contiguous
    msgs = _hot_messages(out / "worker-0.jsonl")
    _in_order(msgs)
    assert len(msgs) >= hot_cam.processed + home_counts["returned"]
    # without the peer: the home goes on, its overflow frames are dropped (counted), order kept
    # (Serve replaces the killed replica and the coordinator names it the peer again: the frames in flight to the
    # dead one, and those offered while it was gone, are what is lost)
    counts = dict(after.overflow.counts)
    assert counts["given_up"] > home_counts["given_up"] and counts["failed"] > home_counts["failed"]
    assert next(c for c in after.cameras if c.camera == "hot").dropped > hot_cam.dropped
    assert _status(dead, "worker-0").healthy
    later = [m for m in msgs if m[2] > killed_at + 2.0]
    assert len(later) >= 10, "the home stopped publishing when its peer died"
