"""`deltayolo run`: load the config, start the runtime, serve until a signal, stop in reverse."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from daemon.app import Runtime
from daemon.config.loader import ConfigError, load_config
from daemon.config.model import Config
from daemon.console import ConsoleSummary
from daemon.outputs.jsonl import JsonlPublisher
from daemon.publish import Publisher

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, type=Path, help="YAML config file")
    p.add_argument("--jsonl", help="also write JSON lines here ('-' for stdout), overriding outputs.jsonl.path")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run until a signal)")
    p.add_argument("--no-console", action="store_true", help="no live summary on the terminal")
    p.add_argument("--stop-timeout", type=float, default=15.0, help="seconds allowed for a clean stop")


def build_publishers(cfg: Config, jsonl_override: str | None) -> list[Publisher]:
    pubs: list[Publisher] = []
    jl = cfg.outputs.jsonl
    path = jsonl_override or (jl.path if jl is not None else None)
    if path:
        pubs.append(JsonlPublisher(path, jl.include_stats if jl else True, jl.flush_every if jl else 1))
    return pubs


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 1
    live = sys.stdout.isatty() and not args.no_console
    console = None if args.no_console else ConsoleSummary(sys.stdout, live, extra="Ctrl-C stops")
    runtime = Runtime(cfg, build_publishers(cfg, args.jsonl), on_stats=console)
    stop = threading.Event()
    try:
        runtime.start()
    except Exception as exc:
        log.error("start failed: %s", exc)
        runtime.stop(args.stop_timeout)
        return 1
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if runtime.all_ended():
                log.info("every source has ended")
                break
    except KeyboardInterrupt:
        pass
    clean = runtime.stop(args.stop_timeout)
    return 0 if clean else 1
