"""On a machine with 2 GPUs (skipped elsewhere): a guest batch whose IPC read fails after the handle opened.

A GPU runtime on GPU 0 (its own process) lends cameras a and b with their reference arrays as CUDA IPC handles. A
guest pipeline on GPU 1 (another process, a GPU engine of its own) opens both handles for real; b's device copy is
replaced by the CUDA error it would raise (the one point injected), its handle is then closed for real. The batch is
served: a warm, b cold and reported as refused (``read_failed``); b's handle opens and reads again afterwards, equal to
the bytes route (the mapping was closed, the process's CUDA state is sound). ``DELTAYOLO_OVERFLOW_JSON=DIR`` writes
read_failed.json there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_cluster_overflow_gpu import HOME_TO_END, ROOT, _child, _gpus, _out

LEND_TWO = HOME_TO_END + r"""
loans = {c.id: borrow(rt, c.id, exporter) for c in cfg.cameras}
(work / "lent.json").write_text(json.dumps({
    "loans": {c: {"data": base64.b64encode(l.data).decode(), "arrays": to_json(l.arrays)} for c, l in loans.items()},
    "bytes_b": base64.b64encode(borrow(rt, "b").data).decode()}))
print(json.dumps({"lent": True}), flush=True)
sys.stdin.readline()  # the exported buffers live until the guest is done
exporter.close()
rt.stop(10.0)
"""

GUEST_FAILING_COPY = r"""
import base64, hashlib, json, sys, time
from pathlib import Path
import cupy, numpy as np
from daemon.backend import build_engine
from daemon.config.model import Config
from daemon.gpu.ipc import from_json, open_ipc, read_shared
from daemon.guest import BorrowedState, GuestProcessor, materialize
from daemon.types import Frame
work = Path(sys.argv[1])
spec = json.loads((work / "home.json").read_text())
lent = json.loads((work / "lent.json").read_text())
home_cfg = spec["config"]
cfg = Config.model_validate({**home_cfg, "model": {**home_cfg["model"], "gpu_device": 1}})
loans = [BorrowedState(c, base64.b64decode(l["data"]), from_json(l["arrays"])) for c, l in lent["loans"].items()]
failing = next(l.arrays.handle for l in loans if l.camera == "b")
events = []
class FailingCopy:
    def __init__(self, mapping):
        self.mapping = mapping
    def read(self, specs):
        events.append("read")
        raise cupy.cuda.runtime.CUDARuntimeError(1)  # cudaErrorInvalidValue, where the device copy would run
    def close(self):
        self.mapping.close()
        events.append("closed")
def open_handle(shared, device):
    mapping = open_ipc(shared, device)
    events.append("opened")
    return FailingCopy(mapping) if shared.handle == failing else mapping
def sha(a):
    return hashlib.sha256(np.ascontiguousarray(cupy.asnumpy(a)).view(np.uint8).tobytes()).hexdigest()
with cupy.cuda.Device(1):
    choice = build_engine(cfg.model, cfg.batching.max_batch)
    proc = GuestProcessor(cfg, choice, open_handle)
    proc.start()
    jpegs = sorted(Path(spec["frames"]).glob("*.jpg"))[-3:]
    frames = [Frame(c.id, 100 + i, time.time(), time.monotonic(), jpeg=p.read_bytes())
              for c in cfg.cameras for i, p in enumerate(jpegs)]
    out = proc.process(frames, cfg.cameras, loans, 120.0)
    again = read_shared(next(l.arrays for l in loans if l.camera == "b"), 1)
    by_bytes = materialize(BorrowedState("b", base64.b64decode(lent["bytes_b"])), time.monotonic())
    proc.stop(10.0)
    choice.engine.close()
print(json.dumps({"results": sorted([r.camera, r.seq] for r in out.results), "errors": len(out.errors),
                  "unfinished": out.unfinished, "warm": list(out.warm), "refused": list(out.refused),
                  "read_failed": list(out.read_failed), "events": events, "again_on_device": int(again[0].device.id),
                  "again_equals_bytes": sha(again[0]) == sha(by_bytes.signature)}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_a_failed_copy_after_a_real_ipc_open_refuses_only_that_camera(model_path: Path, vtest_path: Path) -> None:
    from daemon.sources.replay import load_jpeg_frames

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        frames = work / "frames"
        frames.mkdir()
        for i, j in enumerate(load_jpeg_frames(vtest_path, 90, 12)):
            (frames / f"{i:04d}.jpg").write_bytes(j)
        config = {"node": {"site": "s", "area": "a", "line": "l", "node": "n"},
                  "model": {"path": str(model_path), "gpu_device": 0},
                  "delta": {"enabled": True, "mode": "crops"},
                  "batching": {"max_batch": 4, "max_wait_ms": 5},
                  "cameras": [{"id": c, "source": {"type": "replay", "path": str(frames), "realtime": False}}
                              for c in ("a", "b")]}
        (work / "home.json").write_text(json.dumps({"config": config, "frames": str(frames)}))
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        home = subprocess.Popen([sys.executable, "-c", LEND_TWO, str(work)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            assert home.stdout is not None and home.stdin is not None
            deadline = time.monotonic() + 240
            line = ""
            while '"lent"' not in line:
                line = home.stdout.readline()
                assert line or home.poll() is None, "the home process ended before lending its states"
                assert time.monotonic() < deadline, "the home process did not lend its states in time"
            got = _child(GUEST_FAILING_COPY, work, 300.0)
            home.stdin.write("done\n")
            home.stdin.flush()
            home.wait(60)
        finally:
            if home.poll() is None:
                home.kill()
    _out("read_failed.json", got)
    assert got["results"] == [[c, s] for c in ("a", "b") for s in (100, 101, 102)]  # the whole batch served
    assert (got["errors"], got["unfinished"]) == (0, 0)
    assert got["warm"] == ["a"] and got["refused"] == ["b"] and got["read_failed"] == ["b"]
    assert got["events"] == ["opened", "opened", "read", "closed"]  # a read and closed by open_ipc's own mapping
    assert got["again_on_device"] == 1 and got["again_equals_bytes"]
