"""The features evaluation on the first vtest frames: every mode runs and the report holds together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from daemon.features.evaluate import FeatureEvalOptions, add_arguments, evaluate_features, run


def test_three_modes_side_by_side(model_path: Path, vtest_path: Path, tmp_path: Path) -> None:
    report = evaluate_features(model_path, vtest_path, limit=8, options=FeatureEvalOptions(threads=2))
    assert [m.name for m in report.modes] == ["full", "features", "features+codec", "full-live", "crop"]
    assert report.frames == 8 and report.strides == (8, 16, 32)
    assert report.split_max_rel_diff <= 1e-4
    full, feat, crop = report.mode("full"), report.mode("features"), report.mode("crop")
    assert full.metrics.map50_weighted == pytest.approx(1.0)
    assert report.mode("full-live").metrics.map50_weighted == pytest.approx(1.0)  # same boxes as the live pipeline
    assert feat.decisions == {"full": 1, "regions": 7} and sum(crop.decisions.values()) == 8
    assert feat.metrics.map50_weighted > 0.8 and crop.metrics.map50_weighted > 0.8
    assert 0.5 < feat.work_fraction < 1.0 and 0.0 < crop.work_fraction < 1.0
    b = report.bytes
    assert b.messages == 8 and b.refreshes >= 1
    assert 0 < b.delta_bytes < b.full_int8_bytes < b.full_fp32_bytes
    assert "features+codec" in report.summary()
    data = json.loads(report.write_json(tmp_path / "r.json").read_text())
    assert data["bytes"]["ratio_fp32"] == pytest.approx(b.ratio_fp32)


def test_cli_entry(model_path: Path, vtest_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "f.json"
    args = parser.parse_args(["--model", str(model_path), "--video", str(vtest_path), "--limit", "5",
                              "--no-crop-mode", "--no-codec-head", "--halo", "64", "--json", str(out),
                              "--require-bytes-ratio", "0.4"])
    assert run(args) == 0
    text = capsys.readouterr().out
    assert "halo [64, 64, 64]" in text and out.is_file()
    bad = parser.parse_args(["--model", str(model_path), "--video", str(vtest_path), "--limit", "3",
                             "--no-crop-mode", "--cut", "no_such_tensor"])
    assert run(bad) == 2
    assert "no_such_tensor" in capsys.readouterr().err
