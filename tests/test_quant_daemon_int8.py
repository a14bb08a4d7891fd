"""`precision: int8` end to end on the CPU: a Q/DQ model made by `calibrate --target cpu` on a few frames, run by
the real daemon CLI; detections come out and the log and the stats records name the INT8 file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx

from daemon.quant.calibrate import quant_metadata
from daemon.quant.cli_commands import main as quant_main


def test_daemon_runs_the_int8_model_on_the_cpu(tmp_path: Path, vtest_path: Path, model_path: Path) -> None:
    int8 = tmp_path / "yolov8n.int8.cpu.onnx"
    rc = quant_main(["--log-level", "WARNING", "calibrate", "--model", str(model_path), "--frames",
                     f"{vtest_path}@:4", "--method", "minmax", "--target", "cpu", "--out", str(int8)])
    assert rc == 0
    meta = quant_metadata(onnx.load(str(int8)))
    assert meta is not None and meta["target"] == "cpu" and len(meta["frames"]) == 4
    assert int8.stat().st_size < 0.5 * model_path.stat().st_size

    out = tmp_path / "det.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}, precision: int8, int8_path: {int8}, backend: onnxruntime, threads: 2}}\n"
        "cameras:\n"
        f"  - id: cam-a\n    source: {{type: replay, path: {vtest_path}, realtime: false, loop: false}}\n"
        "batching: {max_batch: 1, max_wait_ms: 5}\nstats: {interval_s: 0.5}\n"
        f"outputs: {{jsonl: {{path: {out}}}}}\n"
    )
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg), "--duration", "8", "--no-console"],
        capture_output=True, text=True, timeout=90, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"int8 model {int8.name}" in proc.stderr, proc.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    dets = [r for r in recs if r["kind"] == "detections"]
    assert len(dets) >= 5
    classes = Counter(b["class"] for r in dets for b in r["boxes"])
    assert classes["person"] >= len(dets)  # the vtest walkers, found by the INT8 model
    stats = [r for r in recs if r["kind"] == "stats"]
    assert stats
    reasons = {json.dumps(r) for r in stats}
    assert any(f"int8 model {int8.name}" in s for s in reasons), sorted(reasons)[:1]
