"""The cluster YAML: example files load, errors name the file line and key, per-worker node configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from cluster.bench import add_arguments as add_bench_arguments
from cluster.bench import bench_config
from cluster.cli import add_arguments as add_up_arguments
from cluster.cli import plan_text, run_cluster_up
from cluster.config import (
    IDLE_CAMERA,
    HotSettings,
    load_cluster_config,
    parse_cluster_config,
    worker_config,
    worker_outputs,
)
from daemon.config.loader import ConfigError
from daemon.config.model import OutputsConfig, Thresholds

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_EXAMPLE = ROOT / "configs" / "cluster-example.yaml"
SERVE_EXAMPLE = ROOT / "configs" / "serve-example.yaml"

MINIMAL = """\
node:
  node: {site: s, area: a, line: l, node: n}
groups:
  - id: g1
    cameras:
      - {id: c1, source: {type: replay, path: builtin:vtest}}
      - {id: c2, source: {type: replay, path: builtin:vtest}}
  - id: g2
    cameras:
      - {id: c3, source: {type: replay, path: builtin:vtest}}
workers:
  count: 2
"""


def test_cluster_example_loads() -> None:
    cfg = load_cluster_config(CLUSTER_EXAMPLE)
    assert cfg.workers.count == 2 and len(cfg.groups) == 4 and len(cfg.cameras()) == 8
    plan = plan_text(cfg)
    assert "worker-0: load 4" in plan and "worker-1: load 4" in plan


def test_serve_example_builds_the_app() -> None:
    pytest.importorskip("ray")
    from ray.serve.schema import ServeDeploySchema

    from cluster.app import build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_EXAMPLE.read_text()))
    (app,) = schema.applications
    assert app.import_path == "cluster.app:build_app"
    args = {"config": str(ROOT / app.args["config"])}
    assert build_app(args) is not None
    for dep in app.deployments:  # the hot knobs of the Serve config are valid HotSettings
        assert HotSettings.model_validate(dep.user_config).thresholds is not None


def test_build_app_args_need_exactly_one_source() -> None:
    pytest.importorskip("ray")
    from cluster.app import build_app

    with pytest.raises(ValueError, match="exactly one of 'config'"):
        build_app({})


def test_minimal_config_defaults() -> None:
    cfg = parse_cluster_config(MINIMAL)
    assert cfg.workers.num_gpus == 1.0 and cfg.coordinator.misses_to_fail == 2
    assert cfg.node.http.enabled is False
    assert [g.load for g in cfg.groups] == [2.0, 1.0]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("count: 2", "count: 0"), "x.yaml:12 workers.count = 0: Input should be greater than or equal to 1"),
        (("id: c3", "id: c1"), "camera id 'c1' in group 'g2' is already used in group 'g1'"),
        (("id: g2", "id: g1"), "group id 'g1' of groups[1] is already used by groups[0]"),
        (("id: c3", f"id: {IDLE_CAMERA}"), "is reserved"),
        (("count: 2", "count: 2\n  bogus: 1"), "x.yaml:13 workers.bogus = 1: unknown key"),
        (("  count: 2", "  count: 3\ncoordinator: {load_factor: 1.0}"),
         "group 'g1' has load 2, above the per-GPU cap 1"),
    ],
)
def test_errors_name_line_and_key(edit: tuple[str, str], message: str) -> None:
    text = MINIMAL.replace(*edit)
    with pytest.raises(ConfigError) as info:
        parse_cluster_config(text, "x.yaml")
    assert message in str(info.value)


def test_duplicate_keys_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"x\.yaml:13 count = : duplicate key"):
        parse_cluster_config(MINIMAL + "  count: 3\n", "x.yaml")


def test_worker_config_enables_only_its_cameras_and_applies_hot_knobs() -> None:
    cfg = parse_cluster_config(MINIMAL)
    cams = cfg.groups[0].cameras
    node = worker_config(cfg.node, "worker-1", cams, HotSettings(thresholds=Thresholds(confidence=0.6)))
    assert node.node.node == "n-worker-1"
    assert [c.id for c in node.cameras] == ["c1", "c2"]
    assert {c.thresholds.confidence for c in node.cameras} == {0.6}
    idle = worker_config(cfg.node, "worker-0", ())
    assert [(c.id, c.enabled) for c in idle.cameras] == [(IDLE_CAMERA, False)]


@pytest.mark.parametrize(
    ("path", "expected"),
    [("out/{worker}.jsonl", "out/worker-3.jsonl"), ("out/det.jsonl", "out/det-worker-3.jsonl"), ("-", "-")],
)
def test_each_worker_writes_its_own_file(path: str, expected: str) -> None:
    outs = worker_outputs(OutputsConfig.model_validate({"jsonl": {"path": path}}), "worker-3")
    assert outs.jsonl is not None and outs.jsonl.path == expected


def test_cluster_up_plan_needs_no_ray(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_up_arguments(parser)
    assert run_cluster_up(parser.parse_args(["-c", str(CLUSTER_EXAMPLE), "--plan"])) == 0
    assert "4 groups, 8 cameras, 2 workers, cap 5" in capsys.readouterr().out


def test_cluster_up_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("count: 2", "count: -1"))
    parser = argparse.ArgumentParser()
    add_up_arguments(parser)
    assert run_cluster_up(parser.parse_args(["-c", str(bad)])) == 1
    assert f"{bad}:12 workers.count = -1" in capsys.readouterr().err


def test_bench_config_runs_the_same_cameras_for_every_gpu_count(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--cameras", "6", "--group-size", "2"])
    one, two = bench_config(args, 1, tmp_path), bench_config(args, 2, tmp_path)
    assert (one.workers.count, two.workers.count) == (1, 2)
    assert one.cameras() == two.cameras() and len(one.groups) == 3
    assert all(c.source.type == "replay" and not c.source.realtime for c in one.cameras())
