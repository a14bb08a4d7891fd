"""Registers `deltayolo cluster up` and `deltayolo bench cluster` through the `deltayolo.commands` entry point,
so the daemon's CLI finds them without importing this package by name."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    from cluster import bench, cli

    p = sub.add_parser("cluster", help="cluster mode on Ray Serve")
    cs = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = cs.add_parser("up", help="start the coordinator and one worker per GPU from cluster.yaml")
    cli.add_arguments(up)
    up.set_defaults(func=_up)
    b = bench_sub.add_parser("cluster", help="throughput with 1, 2, ... GPUs on the same cameras")
    bench.add_arguments(b)
    b.set_defaults(func=_bench)


def _up(args: argparse.Namespace) -> int:
    from cluster.cli import run_cluster_up

    return run_cluster_up(args)


def _bench(args: argparse.Namespace) -> int:
    from cluster.bench import run_cluster_bench

    return run_cluster_bench(args)
