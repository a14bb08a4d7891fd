"""The `deltayolo` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any


def _check_config(args: argparse.Namespace) -> int:
    from daemon.config.loader import ConfigError, load_config

    status = 0
    for path in args.files:
        try:
            cfg = load_config(path)
        except ConfigError as exc:
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok ({len(cfg.cameras)} cameras, node {cfg.node.site}/{cfg.node.area}/"
              f"{cfg.node.line}/{cfg.node.node})")
    return status


def _models_fetch(args: argparse.Namespace) -> int:
    from daemon.models.fetch import KNOWN, FetchError, ensure

    names = args.names or ["yolov8n", "vtest"]
    status = 0
    for name in names:
        if name not in KNOWN:
            print(f"unknown item {name!r}; known: {', '.join(sorted(KNOWN))}", file=sys.stderr)
            status = 1
            continue
        try:
            print(f"{name}: {ensure(name, offline=args.offline)}")
        except FetchError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            status = 1
    return status


def _run(args: argparse.Namespace) -> int:
    from daemon.run import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from daemon.bench.cpu import run_cpu_bench

    return run_cpu_bench(args)


def _bench_gpu(args: argparse.Namespace) -> int:
    from daemon.gpu.bench import run

    return run(args)


def _plugins(sub: Any, bench_sub: Any) -> None:
    """Commands other installed packages register (cluster mode registers `cluster up` and `bench cluster`)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="deltayolo.commands"):
        try:
            ep.load()(sub, bench_sub)
        except Exception as exc:  # a broken plugin must not take the CLI down
            print(f"deltayolo: commands of {ep.name!r} unavailable: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from daemon import __version__

    parser = argparse.ArgumentParser(prog="deltayolo", description="Multi-camera YOLO runtime for edge boxes")
    parser.add_argument("--version", action="version", version=f"deltayolo {__version__}")
    parser.add_argument("--log-level", default=None, help="override the config's logging level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon on a config")
    from daemon.run import add_arguments

    add_arguments(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("check-config", help="validate config files; exit 0 if all are valid, else 1")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_check_config)

    p = sub.add_parser("models", help="known models and data")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    f = msub.add_parser("fetch", help="download and verify by sha256 into the cache")
    f.add_argument("names", nargs="*", help="items (default: yolov8n vtest)")
    f.add_argument("--offline", action="store_true", help="only check the cache")
    f.set_defaults(func=_models_fetch)

    p = sub.add_parser("annotate", help="write a video/JPEGs with boxes, cached boxes and delta regions drawn")
    from daemon.annotate_cli import add_arguments as add_annotate_arguments
    from daemon.annotate_cli import run_annotate

    add_annotate_arguments(p)
    p.set_defaults(func=run_annotate)

    from daemon.quant.cli_commands import (
        add_calibrate_arguments,
        add_fidelity_arguments,
        add_sensitivity_arguments,
        run_calibrate,
        run_fidelity,
        run_sensitivity,
    )

    p = sub.add_parser("calibrate", help="INT8 calibration on your own frames -> Q/DQ ONNX + report")
    add_calibrate_arguments(p)
    p.set_defaults(func=run_calibrate)
    p = sub.add_parser("fidelity", help="a candidate model (e.g. INT8) vs a reference on held-out frames; "
                                        "`fidelity --delta` for delta caching")
    add_fidelity_arguments(p)
    p.set_defaults(func=run_fidelity)
    p = sub.add_parser("int8-sensitivity", help="per-block INT8 sensitivity of one class (which layers to keep)")
    add_sensitivity_arguments(p)
    p.set_defaults(func=run_sensitivity)

    p = sub.add_parser("fidelity-delta", help="delta caching vs full inference on every frame (fidelity --delta)")
    from daemon.delta.fidelity_cli import add_arguments as add_delta_fidelity
    from daemon.delta.fidelity_cli import run as run_delta_fidelity

    add_delta_fidelity(p)
    p.set_defaults(func=run_delta_fidelity)

    p = sub.add_parser("fidelity-features", help="feature caches vs crops vs full inference (fidelity --features)")
    from daemon.features.evaluate import add_arguments as add_features_fidelity
    from daemon.features.evaluate import run as run_features_fidelity

    add_features_fidelity(p)
    p.set_defaults(func=run_features_fidelity)

    p = sub.add_parser("install-service", help="write and enable the systemd units")
    from daemon.service_install import add_arguments as add_install_arguments
    from daemon.service_install import run_install

    add_install_arguments(p)
    p.set_defaults(func=run_install)

    p = sub.add_parser("bench", help="benchmarks with their baselines in the same run")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    from daemon.bench.cpu import add_arguments as add_cpu_bench

    b = bsub.add_parser("cpu", help="CPU pipeline vs a naive loop on replayed vtest cameras")
    add_cpu_bench(b)
    b.set_defaults(func=_bench)
    from daemon.gpu.bench import add_arguments as add_gpu_bench

    g = bsub.add_parser("gpu", help="naive vs CPU-decode+GPU-pre vs the deltayolo runtime on the GPU, plus ceilings")
    add_gpu_bench(g)
    g.set_defaults(func=_bench_gpu)
    from daemon.publish.bench import add_arguments as add_mqtt_bench
    from daemon.publish.bench import main as run_mqtt_bench

    m = bsub.add_parser("mqtt", help="sustained MQTT publishing against a real broker: rate, latency, loss")
    add_mqtt_bench(m)
    m.set_defaults(func=run_mqtt_bench)

    _plugins(sub, bsub)

    p = sub.add_parser("mqtt-tail", help="subscribe to what a node publishes and pretty-print it")
    from daemon.mqtt_tail import add_arguments as add_tail_arguments
    from daemon.mqtt_tail import run_mqtt_tail

    add_tail_arguments(p)
    p.set_defaults(func=run_mqtt_tail)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import logging

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fidelity"] and "--delta" in argv:  # `fidelity --delta` is its own command
        argv = ["fidelity-delta", *[a for a in argv[1:] if a != "--delta"]]
    if argv[:1] == ["fidelity"] and "--features" in argv:  # so is `fidelity --features`
        argv = ["fidelity-features", *[a for a in argv[1:] if a != "--features"]]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, (args.log_level or "INFO").upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
