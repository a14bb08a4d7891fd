"""Spill-over live: the coordinator's control loop over two real WorkerHosts (the real model on replayed vtest
cameras, in this process; the Ray deployments around them are exercised in test_cluster_ray.py) that report each
other as NVLink peers. The saturated worker is found from its runtime's drop counters, its lightest group moves
warm (camera state imported) to the idle peer; when the load falls (the hot camera's finite replay ends) and the
hold time passed, the group comes back, warm again; the camera's numbering continues exactly across both moves."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from cluster import sharding
from cluster.cache_transfer import CacheRoute
from cluster.checkpoint import CheckpointOffer
from cluster.config import NodeTemplate, validate_cluster_data
from cluster.control import ClusterControl
from cluster.host import WorkerHost
from cluster.messages import GroupGrant, GroupHandoff, WorkerIdentity, WorkerStatus
from cluster.metrics import MemorySink, WorkerMetrics
from daemon.backend import EngineChoice, build_engine
from daemon.config.model import ModelConfig
from daemon.sources.replay import load_jpeg_frames

NVLINK = ((0, 18), (18, 0))  # two GPUs of one node joined by NVLink (as NVML reports it)
LEASE = 10_000


class LocalClient:
    """The WorkerClient protocol over a WorkerHost in this process (what the Serve deployment does over Ray)."""

    def __init__(self, host: WorkerHost) -> None:
        self.name = host.identity.worker
        self._host = host

    async def status(self, extensions: Mapping[str, int]) -> WorkerStatus:
        self._host.extend(extensions)
        return await asyncio.to_thread(self._host.status)

    async def checkpoints(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        return await asyncio.to_thread(self._host.checkpoints, cameras, max_bytes)

    async def assign(self, grants: Sequence[GroupGrant]) -> tuple[str, ...]:
        return await asyncio.to_thread(self._host.assign, grants)

    async def release(self, groups: Sequence[str], route: CacheRoute) -> tuple[GroupHandoff, ...]:
        return await asyncio.to_thread(self._host.release, groups, route)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[EngineChoice]:
    choice = build_engine(ModelConfig(path=str(model_path), threads=1), 4)
    yield choice
    choice.engine.close()


def _group_ids() -> tuple[str, str, str]:
    """Names of a heavy and a light group that both shard to worker-0, and one for worker-1."""
    names = [f"g{i}" for i in range(64)]
    for heavy in names:
        for light in names:
            for other in names:
                if len({heavy, light, other}) < 3:
                    continue
                home = sharding.assign({heavy: 3.0, light: 1.0, other: 1.0}, ["worker-0", "worker-1"], 2.0)
                if home == {heavy: "worker-0", light: "worker-0", other: "worker-1"}:
                    return heavy, light, other
    raise AssertionError("no group names with that home placement")


HOT_FRAMES = 360  # at 60 frames/s: 6 s of saturation, then the hot camera ends


def _cluster(out: Path, model: Path, vtest: Path) -> dict[str, Any]:
    heavy, light, other = _group_ids()
    hot = out / "hot"
    hot.mkdir(parents=True, exist_ok=True)
    for i, jpeg in enumerate(load_jpeg_frames(vtest, 90, HOT_FRAMES)):
        (hot / f"{i:04d}.jpg").write_bytes(jpeg)

    def cam(cid: str, fps: float, path: Path = vtest) -> dict[str, Any]:
        return {"id": cid, "queue_size": 1,
                "source": {"type": "replay", "path": str(path), "fps": fps, "loop": path == vtest}}

    return {
        "node": {"node": {"site": "s", "area": "a", "line": "l", "node": "n"},
                 "model": {"path": str(model), "threads": 1}, "delta": {"enabled": True},
                 "batching": {"max_batch": 4, "max_wait_ms": 10},
                 "outputs": {"jsonl": {"path": str(out / "{worker}.jsonl"), "include_stats": False}},
                 "stats": {"interval_s": 0.5}},
        "groups": [{"id": heavy, "weight": 3, "cameras": [cam("hot", 60.0, hot)]},
                   {"id": light, "weight": 1, "cameras": [cam("calm", 2.0)]},
                   {"id": other, "weight": 1, "cameras": [cam("idle", 1.0)]}],
        "workers": {"count": 2},
        "coordinator": {"poll_interval_s": 0.25, "call_timeout_s": 2.0, "seq_lease": LEASE, "load_factor": 2.0,
                        "startup_grace_s": 10, "rebalance_after_s": None, "spill_drop_fraction": 0.1,
                        "spill_window_s": 1.5, "spill_hold_s": 2, "checkpoint_interval_s": None},
    }


def _seqs(path: Path, camera: str) -> list[int]:
    if not path.exists():
        return []
    return [rec["seq"] for line in path.read_text().splitlines()
            if (rec := json.loads(line))["kind"] == "detections" and rec["camera"] == camera]


@pytest.mark.slow
def test_saturated_worker_spills_its_lightest_group_warm_to_its_nvlink_peer(
    tmp_path: Path, model_path: Path, vtest_path: Path, engine: EngineChoice
) -> None:
    cfg = validate_cluster_data(_cluster(tmp_path, model_path, vtest_path))
    template = NodeTemplate.model_validate(cfg.node.model_dump(mode="json"))
    hosts = [WorkerHost(WorkerIdentity(f"worker-{i}", f"w{i}", "node0", i, os.getpid(), None, NVLINK), template,
                        10.0, WorkerMetrics(f"worker-{i}", MemorySink()), engine=engine) for i in range(2)]
    for h in hosts:
        h.start()
    ctl = ClusterControl(cfg, [LocalClient(h) for h in hosts])
    _, light, _ = _group_ids()

    async def until(reason: str, timeout: float) -> float:
        began = time.monotonic()
        while not any(m.reason == reason for m in ctl.snapshot().moves):
            assert time.monotonic() - began < timeout, f"no {reason} within {timeout} s: {ctl.snapshot().moves}"
            await ctl.step()
            await asyncio.sleep(cfg.coordinator.poll_interval_s)
        return time.monotonic() - began

    async def scenario() -> tuple[float, float, dict[str, int]]:
        spilled = await until("spill", 30.0)
        hot_drops = {c.camera: c.dropped for h in hosts for c in h.status().cameras}
        back = await until("unspill", 30.0)
        return spilled, back, hot_drops

    try:
        spilled_s, back_s, drops = asyncio.run(scenario())
        time.sleep(1.5)
        statuses = {h.identity.worker: h.status() for h in hosts}
    finally:
        for h in hosts:
            h.stop(10.0)
    records = ctl.snapshot().moves
    moves = [(m.group, m.source, m.target, m.reason) for m in records]
    timed = [(*mv, round(m.duration_s, 2)) for mv, m in zip(moves, records, strict=True)]
    print(f"\nspill {spilled_s:.1f} s after start, back home {back_s:.1f} s after that; moves {timed}; "
          f"drops at the spill {drops}")
    assert moves == [(light, "worker-0", "worker-1", "spill"), (light, "worker-1", "worker-0", "unspill")]
    assert drops["hot"] > 0 and drops["calm"] == 0  # the saturation was real: the runtime dropped hot frames
    for s in statuses.values():  # the calm camera's state moved with it, both ways
        assert dict(s.cache_moves)["warm"] == 1 and dict(s.cache_moves)["cold"] == 0
    seqs = sorted(_seqs(tmp_path / "worker-0.jsonl", "calm") + _seqs(tmp_path / "worker-1.jsonl", "calm"))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no number lost or repeated over both moves
