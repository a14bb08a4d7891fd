"""Smoke runs of the user-facing commands that are not covered elsewhere (short, real model and video)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_bench_cpu_prints_ratios(tmp_path: Path, model_path: Path, vtest_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _cli("bench", "cpu", "--cameras", "2", "--seconds", "5", "--warmup", "2", "--frames", "20",
                "--max-batch", "2", "--delta", "--int8", str(model_path), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x naive" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["naive"]["frames"] > 0
    # --int8 takes any ONNX (here the FP32 file itself: the plumbing, not the speed-up)
    assert [r["name"] for r in figures["ours"]] == ["deltayolo", "delta", "int8", "int8+delta"]
    assert all(r["frames"] > 0 for r in figures["ours"])


def test_annotate_writes_frames_with_regions(tmp_path: Path, model_path: Path, vtest_path: Path) -> None:
    out = tmp_path / "frames"
    proc = _cli("annotate", "--video", str(vtest_path), "--model", str(model_path), "--out", str(out),
                "--delta", "--frames", "12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(out.glob("*.jpg"))
    assert len(files) >= 12
    img = cv2.imread(str(files[-1]))
    assert img is not None and img.shape == (576, 768, 3)
    assert img.std() > 10


def test_models_fetch_offline_reports_cached_paths(model_path: Path, vtest_path: Path) -> None:
    proc = _cli("models", "fetch", "--offline", "yolov8n", "vtest")
    assert proc.returncode == 0, proc.stderr
    assert str(model_path) in proc.stdout and str(vtest_path) in proc.stdout
    bad = _cli("models", "fetch", "--offline", "nosuchmodel")
    assert bad.returncode == 1
    assert "unknown item 'nosuchmodel'" in bad.stderr
