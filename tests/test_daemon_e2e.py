"""The daemon end to end on the CPU: real model, real video, real JPEG bytes, the real CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from daemon.app import Runtime
from daemon.config.loader import parse_config
from daemon.outputs.jsonl import JsonlPublisher


def _config(tmp_path: Path, cameras: str, extra: str = "") -> str:
    return (
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"cameras:\n{cameras}batching: {{max_batch: 4, max_wait_ms: 5}}\nstats: {{interval_s: 0.5}}\n{extra}"
    )


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_run_finds_people_and_vehicles_in_vtest(tmp_path: Path, vtest_path: Path, model_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "det.jsonl"
    cfg.write_text(_config(tmp_path, (
        f"  - id: cam-a\n    source: {{type: replay, path: {vtest_path}, realtime: false, loop: false}}\n"
    ), f"model: {{path: {model_path}}}\noutputs: {{jsonl: {{path: {out}}}}}\n"))
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg), "--duration", "25", "--no-console"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(out)
    dets = [r for r in recs if r["kind"] == "detections"]
    assert len(dets) >= 20
    classes = Counter(b["class"] for r in dets for b in r["boxes"])  # type: ignore[attr-defined]
    assert classes["person"] > 2 * len(dets)  # several walkers per frame
    assert classes["car"] + classes["truck"] > 0  # the parked vans
    seqs = [r["seq"] for r in dets]
    assert seqs == sorted(seqs)
    assert any(r["kind"] == "stats" for r in recs)


def _bad_frames(folder: Path, bus_path: Path) -> None:
    good = bus_path.read_bytes()
    (folder / "00_good.jpg").write_bytes(good)
    (folder / "01_empty.jpg").write_bytes(b"")
    (folder / "02_truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "03_random.jpg").write_bytes(np.random.default_rng(1).bytes(5000))
    # a valid JPEG header claiming 60000 x 60000 pixels (a decompression bomb)
    _, small = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    data = bytearray(small.tobytes())
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 60000, 60000)
    (folder / "04_bomb.jpg").write_bytes(bytes(data))
    (folder / "05_good.jpg").write_bytes(good)


def test_bad_frames_are_counted_and_other_cameras_keep_serving(
    tmp_path: Path, bus_path: Path, vtest_path: Path, model_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    _bad_frames(bad, bus_path)
    out = tmp_path / "det.jsonl"
    cfg = parse_config(_config(tmp_path, (
        f"  - id: broken\n    source: {{type: replay, path: {bad}, realtime: false, loop: false}}\n"
        f"  - id: fine\n    source: {{type: replay, path: {vtest_path}, realtime: false, loop: false}}\n"
        f"  - id: gone\n    source: {{type: replay, path: {tmp_path / 'missing.avi'}, loop: false}}\n"
    ), f"model: {{path: {model_path}}}\n"))
    rt = Runtime(cfg, [JsonlPublisher(str(out))])
    rt.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snap = {c.camera: c for c in rt.stats.snapshot(rt._source_counters(), 10).cameras}
            if snap["broken"].processed + snap["broken"].corrupt >= 6 and snap["fine"].processed >= 10:
                break
            time.sleep(0.5)
    finally:
        rt.stop(10)
    recs = _records(out)
    errors = Counter(r["error"] for r in recs if r["kind"] == "frame_error" and r["camera"] == "broken")
    assert errors == {"empty": 1, "corrupt": 2, "too_large": 1}, errors
    broken = [r for r in recs if r["kind"] == "detections" and r["camera"] == "broken"]
    assert [r["seq"] for r in broken] == [0, 5]
    order = [r["seq"] for r in recs if r.get("camera") == "broken" and r["kind"] in ("detections", "frame_error")]
    assert order == sorted(order), order  # a camera's results and errors go out in frame order
    assert sum(1 for r in recs if r["kind"] == "detections" and r["camera"] == "fine") >= 10
    states = [(r["camera"], r["state"]) for r in recs if r["kind"] == "camera_state"]
    gone = [st for c, st in states if c == "gone"]
    assert gone and gone[-1] == "failed" and "ended" not in gone, states  # the last (retained) state is the truth


def test_model_that_is_not_onnx_is_a_clear_error(tmp_path: Path, vtest_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"this is not a model")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(_config(tmp_path, f"  - id: a\n    source: {{type: replay, path: {vtest_path}}}\n",
                           f"model: {{path: {bogus}}}\n"))
    proc = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(cfg), "--duration", "5", "--no-console"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 1
    assert str(bogus) in proc.stderr
