"""`calibrate` and `fidelity` commands end to end on the real model, with a few real frames."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.quant.cli_commands import main


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory, model_path: Path, vtest_path: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "m.int8.onnx"
    rc = main(["--log-level", "WARNING", "calibrate", "--model", str(model_path),
               "--frames", f"{vtest_path}@0:300:150", "--method", "minmax", "--out", str(out)])
    assert rc == 0
    return out


def test_calibrate_writes_model_and_report(int8_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = json.loads(int8_model.with_suffix(".calib.json").read_text())
    assert report["target"] == "tensorrt"
    assert report["keep"] == ["decode", "stride8", "/model.6/", "/model.7/", "/model.9/"]
    assert report["frame_count"] == 2 and "/model.0/conv/Conv" in report["kept_nodes"]
    assert report["trt_check"]["ok"] is True


def test_fidelity_leaves_out_calibration_frames(int8_model: Path, model_path: Path, vtest_path: Path,
                                                bus_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--log-level", "WARNING", "fidelity", "--reference", str(model_path), "--candidate",
               str(int8_model), "--frames", f"{vtest_path}@0:3", str(bus_path), "--require-map50", "0.5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "3 frames (1 calibration frames left out)" in out
    report = json.loads(int8_model.with_suffix(".fidelity.json").read_text())
    assert report["frames"] == 3 and report["excluded_calibration_frames"] == 1
    assert report["published"]["ref_objects"] > 0 and report["ranked"]["ref_objects"] > 0
    assert set(report["per_source"]) == {"vtest.avi", "bus.jpg"}
    assert report["candidate"]["bytes"] < 0.5 * report["reference"]["bytes"]
    assert int8_model.with_suffix(".fidelity.png").stat().st_size > 10_000


def test_fidelity_requirement_failure_exits_1(int8_model: Path, model_path: Path, bus_path: Path,
                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--log-level", "WARNING", "fidelity", "--reference", str(model_path), "--candidate",
               str(int8_model), "--frames", str(bus_path), "--json", str(tmp_path / "r.json"),
               "--plot", str(tmp_path / "r.png"), "--require-map50", "1.01"])
    assert rc == 1
    assert "FAILED ranked object-weighted mAP50" in capsys.readouterr().err


def test_only_calibration_frames_is_refused(int8_model: Path, model_path: Path, vtest_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--log-level", "WARNING", "fidelity", "--reference", str(model_path), "--candidate",
               str(int8_model), "--frames", f"{vtest_path}@0:300:150"])
    assert rc == 2
    assert "all 2 frames were calibration frames" in capsys.readouterr().err


def test_calibrate_bad_keep_exits_2(model_path: Path, bus_path: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["calibrate", "--model", str(model_path), "--frames", str(bus_path), "--keep", "/nope/",
               "--out", str(tmp_path / "x.onnx")])
    assert rc == 2
    assert "--keep '/nope/' matches no node" in capsys.readouterr().err


def test_sensitivity_scores_one_block(tmp_path: Path, model_path: Path, vtest_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    ranges = tmp_path / "ranges.json"
    assert main(["--log-level", "WARNING", "calibrate", "--model", str(model_path), "--frames",
                 f"{vtest_path}@0:2", "--method", "minmax", "--ranges", str(ranges),
                 "--out", str(tmp_path / "m.onnx")]) == 0
    rows_path = tmp_path / "rows.json"
    assert main(["--log-level", "WARNING", "sensitivity", "--model", str(model_path), "--ranges", str(ranges),
                 "--frames", f"{vtest_path}@300:302", "--class", "person", "--groups", "/model.0/", "/model.2/",
                 "--min-score", "0", "--json", str(rows_path)]) == 0
    rows = json.loads(rows_path.read_text())
    assert [r["group"] for r in rows] == ["/model.0/", "/model.2/"]
    assert rows[0]["convs"] == 1 and rows[0]["params"] == 448
    assert all(0.5 <= r["ap50_ranked"] <= 1.0 and 0 <= r["score_rms"] < 0.1 for r in rows)
    assert "sensitivity of person (only mode) on 2 of 2 frames" in capsys.readouterr().out
    assert main(["sensitivity", "--model", str(model_path), "--ranges", str(ranges), "--frames",
                 f"{vtest_path}@300:301", "--class", "unicorn"]) == 2
