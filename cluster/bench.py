"""``deltayolo bench cluster``: throughput of 1 GPU vs N GPUs on the same cameras in the same run.

Each step deploys the cluster app with ``workers.count = k`` over the same replayed cameras (vtest, preloaded,
not paced: every worker runs as fast as its pipeline takes frames), waits ``--warmup`` seconds, then counts the
frames the workers processed over ``--seconds``. The figures of each step come from the same process and
machine. Also reported: ``nvidia-smi topo -m`` of the machine, and a cache-sized buffer copied GPU0 -> GPU1 peer
to peer vs staged through pinned host memory (the two routes a camera's reference caches can take when it moves).

Without GPUs, ``--fake-gpus N`` starts Ray with N fake GPU slots (a smoke run on the CPU path: the figures then
say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig, validate_cluster_data

log = logging.getLogger(__name__)

# Backbone outputs of yolov8n at 640x640 (P3 64x80x80, P4 128x40x40, P5 256x20x20) in FP16: one camera's
# reference features.
FEATURE_CACHE_BYTES = (64 * 80 * 80 + 128 * 40 * 40 + 256 * 20 * 20) * 2


@dataclass(frozen=True, slots=True)
class MoveTime:
    """One graceful group move between GPUs during a step: the coordinator's release -> export -> assign ->
    import time, and the round trip of the call that asked for it."""

    group: str
    source: str
    target: str
    duration_s: float
    call_s: float


@dataclass(frozen=True, slots=True)
class StepResult:
    gpus: int
    fps: float
    frames: int
    seconds: float
    per_worker_fps: tuple[tuple[str, float], ...]
    backend: str
    moves: tuple[MoveTime, ...] = ()
    cache_moves: tuple[tuple[str, int], ...] = ()  # ("warm", n), ("cold", n) over the moves, all workers


@dataclass(frozen=True, slots=True)
class CopyTiming:
    nbytes: int
    peer_ms: float | None
    host_ms: float | None
    peer_access: bool
    note: str = ""


@dataclass
class BenchReport:
    cameras: int
    steps: list[StepResult] = field(default_factory=list)
    speedup: float | None = None
    topology: str = ""
    copy: CopyTiming | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", type=int, default=8, help="replayed vtest cameras")
    p.add_argument("--group-size", type=int, default=1, help="cameras per group")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to run, in order")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds before measuring")
    p.add_argument("--batch", type=int, default=8, help="batching.max_batch")
    p.add_argument("--delta", action="store_true", help="delta caching on (default off: raw scaling)")
    p.add_argument("--model", default="builtin:yolov8n", help="model path")
    p.add_argument("--frames", type=int, default=240, help="vtest frames written once as JPEGs and replayed")
    p.add_argument("--num-cpus-per-worker", type=float, default=4.0, help="CPUs reserved per worker")
    p.add_argument("--fake-gpus", type=int, default=0, help="start Ray with this many fake GPU slots (no GPU)")
    p.add_argument("--moves", type=int, default=0,
                   help="after measuring a step of 2+ GPUs, move groups between GPUs this many times (timed)")
    p.add_argument("--json", type=Path, default=None, help="write the report here as JSON")


def write_frames(folder: Path, frames: int) -> Path:
    """The first ``frames`` vtest frames as JPEG files (cameras replay them byte for byte: no encode cost)."""
    from daemon.models.fetch import ensure
    from daemon.sources.replay import load_jpeg_frames

    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(load_jpeg_frames(ensure("vtest"), 90, frames)):
        (folder / f"{i:05d}.jpg").write_bytes(data)
    return folder


def bench_config(args: argparse.Namespace, gpus: int, frames: Path) -> ClusterConfig:
    cams = [{"id": f"cam{i}", "source": {"type": "replay", "path": str(frames), "realtime": False,
                                         "loop": True, "preload": True}} for i in range(args.cameras)]
    size = max(1, args.group_size)
    groups = [{"id": f"g{k // size}", "cameras": cams[k:k + size]} for k in range(0, len(cams), size)]
    return validate_cluster_data({
        "node": {"node": {"site": "bench", "area": "bench", "line": "bench", "node": "bench"},
                 "model": {"path": args.model}, "delta": {"enabled": bool(args.delta)},
                 "batching": {"max_batch": args.batch, "max_wait_ms": 5}, "stats": {"interval_s": 1}},
        "groups": groups,
        "workers": {"count": gpus, "num_gpus": 0 if args.fake_gpus == 0 and _no_gpu() else 1,
                    "num_cpus": args.num_cpus_per_worker, "health_check_timeout_s": 60},
        "coordinator": {"rebalance_after_s": None, "load_factor": 1.0},  # an even split: every GPU busy
    }, "<bench>")


def _no_gpu() -> bool:
    return shutil.which("nvidia-smi") is None


def _processed(handle: Any) -> tuple[int, dict[str, int], str]:
    snap = handle.status.remote().result(timeout_s=60)
    per = {s.identity.worker: sum(c.processed for c in s.cameras) for s in snap.statuses}
    backend = ",".join(sorted({s.backend for s in snap.statuses if s.backend}))
    return sum(per.values()), per, backend


def run_step(args: argparse.Namespace, gpus: int, frames: Path) -> StepResult:
    from ray import serve

    from cluster.app import build_from_config

    cfg = bench_config(args, gpus, frames)
    serve.start(proxy_location="Disabled")
    handle = serve.run(build_from_config(cfg), name="deltayolo-bench", route_prefix=None)
    try:
        deadline = time.monotonic() + 300
        while len(handle.status.remote().result(timeout_s=60).placement) < len(cfg.groups):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{gpus} GPU step: groups not placed within 300 s")
            time.sleep(0.5)
        time.sleep(args.warmup)
        n0, per0, _ = _processed(handle)
        t0 = time.monotonic()
        time.sleep(args.seconds)
        n1, per1, backend = _processed(handle)
        dt = time.monotonic() - t0
        moves, kinds = _move_groups(handle, args.moves) if gpus >= 2 and args.moves > 0 else ((), ())
    finally:
        serve.delete("deltayolo-bench")
    per = tuple(sorted((w, (per1.get(w, 0) - per0.get(w, 0)) / dt) for w in per1))
    return StepResult(gpus, (n1 - n0) / dt, n1 - n0, dt, per, backend, moves, kinds)


def _move_counts(handle: Any) -> dict[str, int]:
    snap = handle.status.remote().result(timeout_s=60)
    out: dict[str, int] = {}
    for s in snap.statuses:
        for kind, n in s.cache_moves:
            out[kind] = out.get(kind, 0) + n
    return out


def _move_groups(handle: Any, n: int) -> tuple[tuple[MoveTime, ...], tuple[tuple[str, int], ...]]:
    """Move groups to another GPU ``n`` times, round robin over the groups, each to the next worker after its
    current one (graceful moves: the camera states travel as DYCS bytes when delta caching is on)."""
    snap = handle.status.remote().result(timeout_s=60)
    workers = sorted(w.worker for w in snap.workers)
    groups = sorted(dict(snap.placement))
    before = _move_counts(handle)
    out: list[MoveTime] = []
    for i in range(n):
        gid = groups[i % len(groups)]
        source = dict(handle.status.remote().result(timeout_s=60).placement)[gid]
        target = workers[(workers.index(source) + 1) % len(workers)]
        t = time.monotonic()
        rec = handle.move_group.remote(gid, target).result(timeout_s=120)
        out.append(MoveTime(gid, source, target, rec.duration_s, time.monotonic() - t))
        print(f"moved {gid} {source} -> {target}: {rec.duration_s * 1e3:.0f} ms", flush=True)
    time.sleep(1.0)  # the workers' next status carries the counts
    after = _move_counts(handle)
    return tuple(out), tuple(sorted((k, after.get(k, 0) - before.get(k, 0)) for k in set(after) | set(before)))


def nvidia_topology() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run(  # noqa: S603 - fixed arguments, the executable found on PATH
            [exe, "topo", "-m"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi topo -m failed: {exc}"
    return out.stdout.strip() or out.stderr.strip()


def time_cache_copy(nbytes: int = FEATURE_CACHE_BYTES, repeats: int = 50) -> CopyTiming:
    """GPU0 -> GPU1: a peer copy vs a copy staged through pinned host memory (median of ``repeats``)."""
    try:
        import cupy
    except ImportError:
        return CopyTiming(nbytes, None, None, False, "cupy not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 2:
            return CopyTiming(nbytes, None, None, False, "fewer than 2 GPUs")
    except Exception as exc:
        return CopyTiming(nbytes, None, None, False, f"no CUDA: {exc}")
    peer = bool(cupy.cuda.runtime.deviceCanAccessPeer(0, 1))
    if peer:
        _enable_peer_access(cupy)
    with cupy.cuda.Device(0):
        src = cupy.ones(nbytes, dtype=cupy.uint8)
    with cupy.cuda.Device(1):
        dst = cupy.empty(nbytes, dtype=cupy.uint8)
    host = cupy.cuda.alloc_pinned_memory(nbytes)
    peer_t: list[float] = []
    host_t: list[float] = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        cupy.cuda.runtime.memcpyPeer(dst.data.ptr, 1, src.data.ptr, 0, nbytes)
        cupy.cuda.Device(1).synchronize()
        peer_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        with cupy.cuda.Device(0):
            cupy.cuda.runtime.memcpy(host.ptr, src.data.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
        with cupy.cuda.Device(1):
            cupy.cuda.runtime.memcpy(dst.data.ptr, host.ptr, nbytes, cupy.cuda.runtime.memcpyHostToDevice)
            cupy.cuda.Device(1).synchronize()
        host_t.append(time.perf_counter() - t)
    peer_t, host_t = sorted(peer_t[1:]), sorted(host_t[1:])  # the first pass warms up
    return CopyTiming(nbytes, peer_t[len(peer_t) // 2] * 1e3, host_t[len(host_t) // 2] * 1e3, peer)


def _enable_peer_access(cupy: Any) -> None:
    for here, there in ((0, 1), (1, 0)):
        with cupy.cuda.Device(here):
            try:
                cupy.cuda.runtime.deviceEnablePeerAccess(there)
            except cupy.cuda.runtime.CUDARuntimeError as exc:  # already enabled
                log.debug("peer access %d -> %d: %s", here, there, exc)


def run_bench(args: argparse.Namespace) -> BenchReport:
    import ray

    report = BenchReport(args.cameras, topology=nvidia_topology())
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if args.fake_gpus:
            kwargs["num_gpus"] = args.fake_gpus
        ray.init(**kwargs)
    try:
        with tempfile.TemporaryDirectory(prefix="deltayolo-bench-") as tmp:
            frames = write_frames(Path(tmp), args.frames)
            for k in args.gpus:
                step = run_step(args, k, frames)
                report.steps.append(step)
                print(f"{k} GPU(s): {step.fps:.1f} frames/s ({step.frames} frames in {step.seconds:.1f} s; "
                      f"{dict(step.per_worker_fps)}; {step.backend})", flush=True)
    finally:
        if started:
            from ray import serve

            serve.shutdown()  # type: ignore[no-untyped-call]
            ray.shutdown()
    base = next((s.fps for s in report.steps if s.gpus == 1), None)
    top = max(report.steps, key=lambda s: s.gpus, default=None)
    if base and top is not None and top.gpus > 1:
        report.speedup = top.fps / base
    report.copy = time_cache_copy()
    return report


def run_cluster_bench(args: argparse.Namespace) -> int:
    report = run_bench(args)
    print("nvidia-smi topo -m:\n" + report.topology)
    if report.speedup is not None:
        print(f"speed-up {report.steps[-1].gpus} GPUs vs 1: {report.speedup:.2f}x")
    for step in report.steps:
        if step.moves:
            ms = sorted(m.duration_s * 1e3 for m in step.moves)
            print(f"{step.gpus} GPUs: {len(ms)} group moves, median {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms; "
                  f"camera moves {dict(step.cache_moves)}")
    if report.copy is not None:
        c = report.copy
        print(f"cache move of {c.nbytes} bytes GPU0->GPU1: peer {c.peer_ms} ms, via pinned host {c.host_ms} ms "
              f"(peer access {c.peer_access}) {c.note}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="deltayolo bench cluster")
    add_arguments(parser)
    sys.exit(run_cluster_bench(parser.parse_args()))


__all__ = ["BenchReport", "MoveTime", "add_arguments", "bench_config", "run_bench", "run_cluster_bench",
           "time_cache_copy"]
