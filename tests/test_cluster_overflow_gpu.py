"""On a machine with 2 GPUs (skipped elsewhere): overflow batches read over peer access.

1. ``test_ipc_arrays_read_over_nvlink_in_another_process``: reference-sized arrays exported on GPU 0 as CUDA IPC
   handles (daemon.gpu.ipc), opened and read on GPU 1 by another process; equal bytes; the peer read timed against
   the host-bytes route (device -> host here, host -> GPU 1 there).
2. ``test_borrowed_state_read_over_peer_access_equals_the_bytes_route``: a GPU runtime on GPU 0 processes vtest
   frames; its camera's state is lent with the arrays as IPC handles; another process materializes it on GPU 1;
   signature, feature maps (where kept) and detections equal the bytes route's.
3. ``test_overflow_bench_two_gpus``: 2 workers on 2 GPUs through Ray Serve, the home overloaded (realtime replays
   above its capacity, queues of 2), overflow off and on in the same run: frames served per second (home's own +
   returned overflow), the ratio, the guest round trip, frames dropped.

``DELTAYOLO_OVERFLOW_JSON=DIR`` writes ipc.json, state.json and bench.json there. Bench knobs (environment):
HOT_CAMERAS (16), HOT_FPS (120), BENCH_SECONDS (20), BENCH_WARMUP (10), BENCH_BATCH (32), BENCH_ROUTES
("off auto host"; "host": overflow on, each worker seeing only its own GPU), FAKE_GPUS (0; N: a CPU smoke run of
the bench with N fake GPUs).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
FEATURE_SHAPES = ((64, 80, 80), (128, 40, 40), (256, 20, 20))  # yolov8n backbone taps at 640, FP16
REPEATS = 30


def _gpus() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def _out(name: str, report: dict[str, Any]) -> None:
    print(json.dumps(report, indent=1, default=str))
    folder = os.environ.get("DELTAYOLO_OVERFLOW_JSON")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / name).write_text(json.dumps(report, indent=1, default=str))


def _child(code: str, arg: Path, timeout: float = 180.0) -> dict[str, Any]:
    """Run ``code`` in a fresh Python process (its own CUDA context) with ``arg``; its last stdout line as JSON."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, str(arg)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"child process failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _sha(a: Any) -> str:
    host = np.ascontiguousarray(a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a)
    return hashlib.sha256(host.view(np.uint8).tobytes()).hexdigest()


READ_ARRAYS = r"""
import hashlib, json, sys, time
import cupy, numpy as np
from daemon.gpu.ipc import from_json, read_shared
spec = json.load(open(sys.argv[1]))
peer, host = from_json(spec["peer"]), from_json(spec["host"])
cupy.cuda.Device(1).use()
cupy.zeros(1).sum()  # context up before timing
def sha(a):
    return hashlib.sha256(np.ascontiguousarray(cupy.asnumpy(a)).view(np.uint8).tobytes()).hexdigest()
out = {"can_access_peer_1_0": bool(cupy.cuda.runtime.deviceCanAccessPeer(1, 0))}
got = read_shared(peer, 1)
out["peer_sha"] = [sha(a) for a in got]
out["peer_on_device"] = [int(a.device.id) for a in got]
t_peer, t_host = [], []
for _ in range(spec["repeats"]):
    t = time.perf_counter(); read_shared(peer, 1); t_peer.append(time.perf_counter() - t)
    t = time.perf_counter()
    arrays = [cupy.asarray(a) for a in read_shared(host)]
    cupy.cuda.Device(1).synchronize(); t_host.append(time.perf_counter() - t)
out["host_sha"] = [sha(a) for a in arrays]
out["peer_read_ms_median"] = 1e3 * sorted(t_peer)[len(t_peer) // 2]
out["host_upload_ms_median"] = 1e3 * sorted(t_host)[len(t_host) // 2]
print(json.dumps(out))
"""


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_ipc_arrays_read_over_nvlink_in_another_process() -> None:
    import cupy

    from daemon.gpu.ipc import IpcExporter, export_host, to_json

    with cupy.cuda.Device(0):
        rng = cupy.random.default_rng(7)
        sig = (rng.random((80, 80)) * 255).astype(cupy.uint8)
        feats = [rng.standard_normal(s, dtype=cupy.float32).astype(cupy.float16) for s in FEATURE_SHAPES]
        arrays = [("signature", sig), *((f"features.{i}", f) for i, f in enumerate(feats))]
        exporter = IpcExporter(0)
        t = time.perf_counter()
        peer = exporter.export("cam", arrays)
        export_ms = (time.perf_counter() - t) * 1e3
        d2h = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            host = export_host(arrays)
            d2h.append(time.perf_counter() - t)
    want = [_sha(a) for _, a in arrays]
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"peer": to_json(peer), "host": to_json(host), "repeats": REPEATS}))
        got = _child(READ_ARRAYS, spec)
    exporter.close()
    host_ms = 1e3 * sorted(d2h)[len(d2h) // 2] + got["host_upload_ms_median"]
    report = {**got, "bytes": peer.nbytes, "export_ms_first": export_ms, "host_d2h_ms_median": 1e3 * sorted(d2h)[
        len(d2h) // 2], "host_route_ms_median": host_ms, "peer_vs_host": got["peer_read_ms_median"] / host_ms}
    _out("ipc.json", report)
    assert got["peer_sha"] == want and got["host_sha"] == want
    assert got["peer_on_device"] == [1] * len(arrays)


# a home process (GPU 0): work/home.json's config replayed to its end, an IPC exporter ready (`rt`, `exporter`)
HOME_TO_END = r"""
import base64, hashlib, json, sys, time
import numpy as np
from pathlib import Path
from daemon.app import Runtime
from daemon.config.model import Config
from daemon.gpu.ipc import IpcExporter, to_json
from daemon.guest import borrow
from daemon.sources.replay import ReplaySource
work = Path(sys.argv[1])
spec = json.loads((work / "home.json").read_text())
cfg = Config.model_validate(spec["config"])
rt = Runtime(cfg, source_factory=lambda cam, to: ReplaySource(cam.id, spec["frames"], to, loop=False, realtime=False))
rt.start()
deadline = time.monotonic() + 120
while not rt.all_ended() and time.monotonic() < deadline:
    time.sleep(0.1)
exporter = IpcExporter(0)
"""

LEND_HOME = HOME_TO_END + r"""
by_peer = borrow(rt, "cam", exporter, with_features=True)
by_bytes = borrow(rt, "cam", with_features=True)
(work / "lent.json").write_text(json.dumps({
    "backend": rt.engine_choice.backend if rt.engine_choice is not None else "",
    "peer": {"data": base64.b64encode(by_peer.data).decode(), "arrays": to_json(by_peer.arrays)},
    "bytes": base64.b64encode(by_bytes.data).decode()}))
print(json.dumps({"lent": True}), flush=True)
sys.stdin.readline()  # the exported buffers live until the reader is done
exporter.close()
rt.stop(10.0)
"""

READ_STATE = r"""
import base64, hashlib, json, sys, time
import numpy as np
from pathlib import Path
from daemon.gpu.ipc import from_json
from daemon.guest import BorrowedState, materialize
work = Path(sys.argv[1])
lent = json.loads((work / "lent.json").read_text())
peer = BorrowedState("cam", base64.b64decode(lent["peer"]["data"]), from_json(lent["peer"]["arrays"]))
ref = BorrowedState("cam", base64.b64decode(lent["bytes"]))
def sha(a):
    a = a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()
def summary(s):
    return {"signature": sha(s.signature), "features": [sha(f) for f in s.features],
            "feature_devices": [int(getattr(getattr(f, "device", None), "id", -1)) for f in s.features],
            "detections": [[d.class_id, round(d.x1, 3), round(d.y1, 3), round(d.x2, 3), round(d.y2, 3)]
                           for d in s.detections], "has_reference": s.policy.has_reference}
t = time.perf_counter(); a = materialize(peer, time.monotonic(), 1); peer_ms = (time.perf_counter() - t) * 1e3
t = time.perf_counter(); b = materialize(ref, time.monotonic(), 1); bytes_ms = (time.perf_counter() - t) * 1e3
print(json.dumps({"peer": summary(a), "bytes": summary(b), "peer_ms": peer_ms, "bytes_ms": bytes_ms,
                  "peer_arrays_bytes": peer.arrays.nbytes, "state_bytes": len(ref.data)}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_borrowed_state_read_over_peer_access_equals_the_bytes_route(model_path: Path, vtest_path: Path) -> None:
    from daemon.sources.replay import load_jpeg_frames

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        frames = work / "frames"
        frames.mkdir()
        for i, j in enumerate(load_jpeg_frames(vtest_path, 90, 12)):
            (frames / f"{i:04d}.jpg").write_bytes(j)
        config = {"node": {"site": "s", "area": "a", "line": "l", "node": "n"},
                  "model": {"path": str(model_path), "gpu_device": 0},
                  "delta": {"enabled": True, "mode": os.environ.get("OVERFLOW_DELTA_MODE", "features")},
                  "batching": {"max_batch": 4, "max_wait_ms": 5},
                  "cameras": [{"id": "cam", "source": {"type": "replay", "path": str(frames), "realtime": False}}]}
        (work / "home.json").write_text(json.dumps({"config": config, "frames": str(frames)}))
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        home = subprocess.Popen([sys.executable, "-c", LEND_HOME, str(work)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            assert home.stdout is not None and home.stdin is not None
            deadline = time.monotonic() + 240
            line = ""
            while '"lent"' not in line:
                line = home.stdout.readline()
                assert line or home.poll() is None, "the home process ended before lending its state"
                assert time.monotonic() < deadline, "the home process did not lend its state in time"
            got = _child(READ_STATE, work)
            home.stdin.write("done\n")
            home.stdin.flush()
            home.wait(60)
        finally:
            if home.poll() is None:
                home.kill()
    _out("state.json", got)
    assert got["peer"]["has_reference"]
    assert got["peer"]["signature"] == got["bytes"]["signature"]
    assert got["peer"]["features"] == got["bytes"]["features"]
    assert all(d == 1 for d in got["peer"]["feature_devices"])
    assert got["peer"]["detections"] == got["bytes"]["detections"]


# -- the bench --------------------------------------------------------------------------------------------------
def _group_names() -> tuple[str, str]:
    from cluster import sharding

    for a, b in itertools.permutations([f"g{i}" for i in range(32)], 2):
        if sharding.assign({a: 1.0, b: 1.0}, ["worker-0", "worker-1"], 1.25) == {a: "worker-0", b: "worker-1"}:
            return a, b
    raise AssertionError("no group names with that placement")


def bench_config(frames: Path, route: str, fake: bool) -> Any:
    from cluster.config import validate_cluster_data

    hot, calm = _group_names()
    n, fps = int(os.environ.get("HOT_CAMERAS", "16")), float(os.environ.get("HOT_FPS", "120"))
    batch = int(os.environ.get("BENCH_BATCH", "32"))

    def cam(cid: str, rate: float) -> dict[str, Any]:
        return {"id": cid, "queue_size": 2, "source": {"type": "replay", "path": str(frames), "fps": rate,
                                                       "loop": True, "preload": True}}

    overflow = {"enabled": route != "off", "max_batch": batch, "max_wait_ms": 10, "timeout_ms": 2000,
                "max_pending": 4 * batch, "peer_only": not fake,  # fake GPUs have no NVLink peers
                "route": route if route in ("host", "peer") else "auto",
                "all_devices_visible": route in ("auto", "peer") and not fake}  # peer: states read over NVLink
    from daemon.models.fetch import ensure

    return validate_cluster_data({
        "node": {"node": {"site": "b", "area": "b", "line": "b", "node": "b"},
                 "model": {"path": str(ensure("yolov8n")), "threads": 1},
                 "delta": {"enabled": True}, "batching": {"max_batch": batch, "max_wait_ms": 5},
                 "stats": {"interval_s": 1}},
        "groups": [{"id": hot, "cameras": [cam(f"hot{i}", fps) for i in range(n)]},
                   {"id": calm, "cameras": [cam("calm", 5.0)]}],
        "workers": {"count": 2, "num_gpus": 1, "num_cpus": 0.5 if fake else 4, "health_check_timeout_s": 60,
                    "overflow": overflow},
        "coordinator": {"rebalance_after_s": None, "load_factor": 2.0, "checkpoint_interval_s": None,
                        "startup_grace_s": 120},
    }, "<overflow bench>")


def _served(handle: Any) -> dict[str, Any]:
    snap = handle.status.remote().result(timeout_s=60)
    home = next(s for s in snap.statuses if s.identity.worker == "worker-0")
    peer = next(s for s in snap.statuses if s.identity.worker == "worker-1")
    hot = [c for c in home.cameras if c.camera.startswith("hot")]
    counts = dict(home.overflow.counts)
    return {"own": sum(c.processed for c in hot), "returned": counts.get("returned", 0),
            "dropped": sum(c.dropped for c in hot), "overflowed": sum(c.overflowed for c in hot), "counts": counts,
            "round_trip_ms": home.overflow.round_trip_ms, "peer": home.overflow.peer, "backend": home.backend,
            "loans": {"home": dict(home.overflow.home_routes), "home_fallbacks": dict(home.overflow.home_fallbacks),
                      "guest": dict(peer.overflow.guest_routes),
                      "guest_fallbacks": dict(peer.overflow.guest_fallbacks)},
            "guest": {"frames": peer.overflow.guest_frames, "decisions": dict(peer.overflow.guest_decisions),
                      "cold": peer.overflow.guest_cold, "keyframes": peer.overflow.guest_keyframes,
                      "refused": peer.overflow.guest_refused}}


def run_step(route: str, frames: Path, fake: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from ray import serve

    from cluster.app import build_from_config

    cfg = bench_config(frames, route, fake)
    warmup, seconds = float(os.environ.get("BENCH_WARMUP", "10")), float(os.environ.get("BENCH_SECONDS", "20"))
    serve.start(proxy_location="Disabled")
    t0 = time.monotonic()
    handle = serve.run(build_from_config(cfg), name=f"overflow-{route}", route_prefix=None)
    try:
        while len(handle.status.remote().result(timeout_s=60).placement) < 2:
            if time.monotonic() - t0 > 240:
                raise TimeoutError(f"step {route}: groups not placed within 240 s")
            time.sleep(0.5)
        log(f"step {route}: placed after {time.monotonic() - t0:.1f} s; warm-up {warmup:g} s")
        time.sleep(warmup)
        a, ta = _served(handle), time.monotonic()
        time.sleep(seconds)
        b, tb = _served(handle), time.monotonic()
    finally:
        serve.delete(f"overflow-{route}")
    dt = tb - ta
    served = (b["own"] - a["own"] + b["returned"] - a["returned"]) / dt
    step = {"route": route, "seconds": dt, "served_fps": served, "own_fps": (b["own"] - a["own"]) / dt,
            "returned_fps": (b["returned"] - a["returned"]) / dt, "dropped_fps": (b["dropped"] - a["dropped"]) / dt,
            "overflowed_fps": (b["overflowed"] - a["overflowed"]) / dt, "end": b}
    log(f"step {route}: served {served:.1f} frames/s (own {step['own_fps']:.1f}, returned "
        f"{step['returned_fps']:.1f}), dropped {step['dropped_fps']:.1f}/s, round trip p50/p99 "
        f"{b['round_trip_ms']}, loans by route {b['loans']}, guest {b['guest']}")
    return step


def run_bench(fake_gpus: int = 0) -> dict[str, Any]:
    import ray

    from daemon.sources.replay import load_jpeg_frames

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    routes = os.environ.get("BENCH_ROUTES", "off auto host").split()
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT)), "ORT_DISABLE_TELEMETRY": "1",
           "DELTAYOLO_CACHE": os.environ.get("DELTAYOLO_CACHE", "")}
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": False,
                              "runtime_env": {"env_vars": {k: v for k, v in env.items() if v}}}
    if fake_gpus:
        kwargs.update(num_gpus=fake_gpus, num_cpus=2)
    steps: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    ray.init(**kwargs)
    try:
        with tempfile.TemporaryDirectory(prefix="overflow-bench-") as tmp:
            folder = Path(tmp)
            for i, data in enumerate(load_jpeg_frames(_vtest(), 90, 240)):
                (folder / f"{i:05d}.jpg").write_bytes(data)
            for route in routes:
                try:
                    steps.append(run_step(route, folder, bool(fake_gpus), log))
                except Exception as exc:  # one failing step must not hide the others
                    errors[route] = f"{type(exc).__name__}: {exc}"
                    log(f"step {route} FAILED: {errors[route]}")
                _out("bench.json", {"partial": True, "steps": steps, "errors": errors})  # kept if time runs out
    finally:
        from ray import serve

        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
    by = {s["route"]: s for s in steps}
    ratios = {r: by[r]["served_fps"] / by["off"]["served_fps"] for r in by if r != "off" and "off" in by
              and by["off"]["served_fps"] > 0}
    return {"steps": steps, "errors": errors, "served_ratio_vs_off": ratios,
            "hot_cameras": int(os.environ.get("HOT_CAMERAS", "16")), "hot_fps": float(os.environ.get("HOT_FPS", "120"))}


def _vtest() -> Path:
    from daemon.models.fetch import ensure

    return ensure("vtest")


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_overflow_bench_two_gpus() -> None:
    pytest.importorskip("ray")
    report = run_bench(int(os.environ.get("FAKE_GPUS", "0")))
    _out("bench.json", report)
    assert not report["errors"], report["errors"]
    on = [s for s in report["steps"] if s["route"] != "off"]
    assert on and all(s["end"]["counts"].get("returned", 0) > 0 for s in on)
    assert all(s["end"]["guest"]["keyframes"] == 0 for s in on)


if __name__ == "__main__":  # a CPU smoke run of the bench: python3 tests/test_cluster_overflow_gpu.py FAKE_GPUS
    print(json.dumps(run_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 2), indent=1, default=str))
