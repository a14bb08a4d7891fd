"""Config loading: strict models, errors pinned to file:line key.path = value: message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config.loader import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml")
                 if not p.name.startswith(("cluster-", "serve-")))  # cluster configs: tests/test_cluster_config.py

BASE = """\
version: 1
node: {site: s, area: a, line: l, node: n}
cameras:
  - id: cam1
    source:
      type: replay
      path: builtin:vtest
"""


def _errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    return [str(i) for i in info.value.issues]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.cameras


def test_minimal_config_defaults() -> None:
    cfg = parse_config(BASE)
    cam = cfg.cameras[0]
    assert cam.thresholds.confidence == 0.25
    assert cfg.batching.max_batch == 8
    assert cfg.model.path == "builtin:yolov8n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE + "      fps: -3\n", "c.yaml:8 cameras[0].source.fps = -3: Input should be greater than 0"),
        (BASE + "      colour: red\n", "c.yaml:8 cameras[0].source.colour = 'red': unknown key"),
        (BASE + "batching: {max_batch: 0}\n",
         "c.yaml:8 batching.max_batch = 0: Input should be greater than or equal to 1"),
        (BASE.replace("id: cam1", "id: 'cam 1'"),
         "c.yaml:4 cameras[0].id = 'cam 1': String should match pattern '^[A-Za-z0-9_-]+$'"),
        (BASE.replace("type: replay", "type: webcam"),
         "c.yaml:6 cameras[0].source.type = 'webcam': unknown type; expected one of "
         "'replay', 'http-mjpeg', 'rtsp', 'file'"),
        (BASE + "  - id: cam1\n    source: {type: replay, path: x.avi}\n",
         "c.yaml:3 cameras = [...]: camera id 'cam1' of cameras[1] is already used by cameras[0]"),
        (BASE + "model: {precision: int8}\n",
         "c.yaml:8 model = {...}: precision int8 needs int8_path (make one with `deltayolo calibrate`)"),
        (BASE.replace("node: {site: s, area: a, line: l, node: n}\n", ""),
         "c.yaml:1 node = (missing): Field required"),
        (BASE + "    roi: [10, 10, 5, 20]\n",
         "c.yaml:8 cameras[0].roi = [10, 10, 5, 20]: roi must be x1, y1, x2, y2 with 0 <= x1 < x2 and "
         "0 <= y1 < y2, got [10, 10, 5, 20]"),
        (BASE + "    source2: 1\n", "c.yaml:8 cameras[0].source2 = 1: unknown key"),
    ],
)
def test_error_messages_point_at_the_line(text: str, expected: str) -> None:
    assert expected in _errors(text)


def test_yaml_syntax_error_has_line() -> None:
    errs = _errors(BASE + "stats: {interval_s: [\n")
    assert errs[0].startswith("c.yaml:")
    assert "YAML syntax error" in errs[0]


def test_duplicate_keys_rejected() -> None:
    assert _errors(BASE + "stats: {interval_s: 1}\nstats: {interval_s: 2}\n") == ["c.yaml:9 stats = : duplicate key"]


def test_not_a_mapping() -> None:
    assert _errors("- a\n- b\n") == ["c.yaml:1 the config must be a YAML mapping"]


def test_credentials_in_url_rejected() -> None:
    text = BASE.replace("type: replay\n      path: builtin:vtest", "type: http-mjpeg\n      url: http://u:p@h/x")
    assert any("put credentials in username/password_file" in e for e in _errors(text))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read config" in str(info.value)


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "      fps: -3\n")
    good = tmp_path / "good.yaml"
    good.write_text(BASE)
    cmd = [sys.executable, "-m", "daemon.cli", "check-config"]
    ok = subprocess.run([*cmd, str(good)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([*cmd, str(good), str(bad)], capture_output=True, text=True, check=False)
    assert fail.returncode == 1
    assert f"{bad}:8 cameras[0].source.fps = -3: Input should be greater than 0" in fail.stderr
