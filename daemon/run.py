"""`deltayolo run`: load the config, start the runtime, serve until a signal, stop in reverse.

Order: logging -> runtime (sources, pipeline, publishers; the engine warms up here) -> HTTP -> watchdog ->
READY=1. SIGHUP re-reads the config (an invalid one is rejected with its errors, the running one stays);
SIGTERM/SIGINT -> STOPPING=1 -> drain -> exit.
"""

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
from daemon.httpserver.server import HttpServer
from daemon.lifecycle.sdnotify import SdNotifier
from daemon.lifecycle.signals import SignalHandlers
from daemon.lifecycle.watchdog import pinger_for
from daemon.logsetup import setup_logging
from daemon.outputs.jsonl import JsonlPublisher
from daemon.preview import PreviewHub
from daemon.publish import Publisher
from daemon.stats.model import NodeStats

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, type=Path, help="YAML config file")
    p.add_argument("--jsonl", help="also write JSON lines here ('-' for stdout), overriding outputs.jsonl.path")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: run until a signal)")
    p.add_argument("--no-console", action="store_true", help="no live summary on the terminal")
    p.add_argument("--no-http", action="store_true", help="do not serve /healthz, /metrics, /preview")
    p.add_argument("--http-port", type=int, default=None, help="override http.port")
    p.add_argument("--stop-timeout", type=float, default=15.0, help="seconds allowed for a clean stop")


def build_publishers(cfg: Config, jsonl_override: str | None) -> list[Publisher]:
    pubs: list[Publisher] = []
    jl = cfg.outputs.jsonl
    path = jsonl_override or (jl.path if jl is not None else None)
    if path:
        pubs.append(JsonlPublisher(path, jl.include_stats if jl else True, jl.flush_every if jl else 1))
    return pubs


def _attach_mqtt(cfg: Config, runtime: Runtime) -> None:
    """MQTT is built after the runtime so its commands can reach the running cameras."""
    if cfg.outputs.mqtt is None:
        return
    from daemon.commands import RuntimeCommands, validate_delta
    from daemon.publish.mqtt import build_mqtt_publisher

    handler = RuntimeCommands(runtime) if cfg.outputs.mqtt.commands.enabled else None
    runtime.publishers.append(build_mqtt_publisher(cfg, handler, validate_delta))


def _load(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


def run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    repeats = setup_logging(cfg.logging.format, args.log_level or cfg.logging.level, cfg.logging.levels,
                            stream=sys.stderr)
    try:
        return _serve(cfg, args)
    finally:
        repeats.flush_all()


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    notifier = SdNotifier.from_env()
    live = sys.stdout.isatty() and not args.no_console
    console = None if args.no_console else ConsoleSummary(sys.stdout, live, extra="Ctrl-C stops")

    def on_stats(stats: NodeStats) -> None:
        notifier.status(f"{stats.fps:.1f} fps, {sum(c.alive for c in stats.cameras)}/{len(stats.cameras)} "
                        f"cameras up, p50 {stats.latency_p50_ms:.0f} ms")
        if console is not None:
            console(stats)

    hub = PreviewHub(max_fps=cfg.http.preview_fps) if cfg.http.enabled and not args.no_http else None
    try:
        runtime = Runtime(cfg, build_publishers(cfg, args.jsonl), observers=[hub] if hub else [], on_stats=on_stats)
        _attach_mqtt(cfg, runtime)
    except Exception as exc:
        log.error("cannot build the runtime: %s", exc)
        return 1
    stop, reload = threading.Event(), threading.Event()
    with SignalHandlers(stop, on_reload=reload.set):
        try:
            runtime.start()
        except Exception as exc:
            log.error("start failed: %s", exc)
            runtime.stop(args.stop_timeout)
            return 1
        server = _start_http(cfg, args, runtime, hub)
        pinger = pinger_for(notifier, runtime.heartbeat_age)
        if pinger is not None:
            pinger.start()
        notifier.ready(f"serving {len(runtime.sources)} cameras")
        _wait(runtime, stop, reload, notifier, args)
        notifier.stopping("draining")
        clean = runtime.stop(args.stop_timeout)
        if server is not None:
            server.stop()
        if pinger is not None:
            pinger.stop()
    return 0 if clean else 1


def _start_http(cfg: Config, args: argparse.Namespace, runtime: Runtime, hub: PreviewHub | None) -> HttpServer | None:
    if hub is None:
        return None
    port = cfg.http.port if args.http_port is None else args.http_port
    server = HttpServer(runtime, runtime, hub, host=cfg.http.host, port=port, max_streams=cfg.http.max_streams)
    try:
        server.start()
    except OSError as exc:
        log.error("HTTP endpoint %s:%d not served: %s", cfg.http.host, port, exc)
        return None
    log.info("HTTP endpoint at %s", server.url)
    return server


def _wait(runtime: Runtime, stop: threading.Event, reload: threading.Event, notifier: SdNotifier,
          args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.duration if args.duration > 0 else None
    try:
        while not stop.wait(0.25):
            if reload.is_set():
                reload.clear()
                _reload(runtime, args.config, notifier)
            if deadline is not None and time.monotonic() >= deadline:
                break
            if runtime.all_ended():
                log.info("every source has ended")
                break
    except KeyboardInterrupt:
        pass


def _reload(runtime: Runtime, path: Path, notifier: SdNotifier) -> None:
    notifier.reloading("re-reading the config")
    new = _load(path)
    if new is None:
        log.error("config %s is invalid; keeping the running one", path)
    else:
        try:
            report = runtime.apply_config(new)
            if report.needs_restart:
                log.warning("changes to %s need a restart; running with the old values",
                            ", ".join(report.needs_restart))
        except Exception as exc:
            log.error("reload failed, the running cameras are kept: %s", exc)
    notifier.ready(f"serving {len(runtime.sources)} cameras")
