"""``deltayolo cluster up -c cluster.yaml``: start (or join) Ray, deploy the app, report until stopped.

Importing this module does not import Ray (the daemon's CLI builds its parser without it); ``run_cluster_up``
does. With ``ray.address: null`` a local Ray instance is started (NVLink islands of this node registered as custom
resources, dashboard on loopback with ``RAY_AUTH_MODE=disabled`` unless the environment says otherwise) and shut
down at the end; with an address the app is deployed to that cluster and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from cluster.config import ClusterConfig, load_cluster_config, worker_name
from cluster.placement import GpuSite, partners
from cluster.sharding import assign, gpu_loads, load_cap
from cluster.topology import describe, island_resources, islands_from_links, read_link_matrix
from daemon.config.loader import ConfigError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``deltayolo cluster up``."""
    p.add_argument("--config", "-c", required=True, type=Path, help="cluster YAML file")
    p.add_argument("--address", default=None, help="Ray address to join (overrides ray.address; 'auto' for local)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until a signal)")
    p.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines (0: never)")
    p.add_argument("--plan", action="store_true", help="print the home placement and partners, do not start")


def _load(path: Path) -> ClusterConfig | None:
    try:
        return load_cluster_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


def plan_text(cfg: ClusterConfig) -> str:
    """The home placement (sharding), loads against the cap, and each worker's fail-over order (by name only:
    NVLink peers are known once the workers report their GPUs)."""
    names = [worker_name(i) for i in range(cfg.workers.count)]
    loads = {g.id: g.load for g in cfg.groups}
    home = assign(loads, names, cfg.coordinator.load_factor)
    per = gpu_loads(home, loads, names)
    cap = load_cap(sum(loads.values()), len(names), cfg.coordinator.load_factor)
    lines = [f"{len(cfg.groups)} groups, {len(cfg.cameras())} cameras, {len(names)} workers, cap {cap:g}"]
    pts = partners([GpuSite(n, "node", i) for i, n in enumerate(names)])
    for n in names:
        groups = sorted(g for g, w in home.items() if w == n)
        lines.append(f"  {n}: load {per[n]:g} groups {', '.join(groups) or '-'}; "
                     f"fail-over {', '.join(pts[n].failover[:3]) or '-'}")
    return "\n".join(lines)


def topology_text() -> str:
    """This node's NVLink matrix and islands, and the custom resources to give ``ray start --resources``."""
    links = read_link_matrix()
    if links is None:
        return "NVLink topology: NVML not available on this node (no NVIDIA driver)"
    islands = islands_from_links(links)
    resources = json.dumps(island_resources(islands))
    return f"{describe(links)}\nNVLink islands: {list(islands)}\nray start --resources '{resources}'"


def _start_ray(cfg: ClusterConfig, address: str | None) -> bool:
    """Connect to Ray; True when this call started a local instance (and must shut it down)."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is not None:
        ray.init(address=address, namespace=cfg.ray.namespace, logging_level=logging.WARNING)
        return False
    if cfg.ray.dashboard_host in ("127.0.0.1", "localhost", "::1"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback dashboard: no token (PLATFORM.md)
    resources: dict[str, float] = {}
    links = read_link_matrix()
    if links is not None and cfg.ray.register_topology:
        resources = island_resources(islands_from_links(links))
    print(topology_text())
    kwargs: dict[str, Any] = {
        "namespace": cfg.ray.namespace, "include_dashboard": cfg.ray.dashboard, "logging_level": logging.WARNING,
        "resources": resources or None,
    }
    if cfg.ray.dashboard:
        kwargs.update(dashboard_host=cfg.ray.dashboard_host, dashboard_port=cfg.ray.dashboard_port)
    if cfg.ray.num_cpus is not None:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.num_gpus is not None:
        kwargs["num_gpus"] = cfg.ray.num_gpus
    ray.init(**kwargs)
    return True


def _status_line(snap: Any) -> str:
    alive = sum(w.alive for w in snap.workers)
    fps = sum(s.fps for s in snap.statuses)
    last = snap.moves[-1] if snap.moves else None
    moved = f", last move {last.group} {last.source}->{last.target} ({last.reason}, {last.duration_s:.2f} s)" \
        if last else ""
    return (f"{alive}/{len(snap.workers)} workers alive, {len(snap.placement)} groups placed, "
            f"{len(snap.unplaced)} waiting, {fps:.1f} fps{moved}")


def run_cluster_up(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    if args.plan:
        print(plan_text(cfg))
        print(topology_text())
        return 0
    from ray import serve

    from cluster.app import build_from_config

    started = _start_ray(cfg, args.address if args.address is not None else cfg.ray.address)
    stop = threading.Event()
    previous = {s: signal.signal(s, _setter(stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(proxy_location="Disabled")  # the app has no HTTP route: no proxy, no port taken
        handle = serve.run(build_from_config(cfg), name=cfg.ray.app_name, route_prefix=None)
        print(plan_text(cfg))
        deadline = time.monotonic() + args.duration if args.duration > 0 else None
        next_status = time.monotonic()
        while not stop.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if args.status_every > 0 and time.monotonic() >= next_status:
                next_status += args.status_every
                print(_status_line(handle.status.remote().result(timeout_s=30)), flush=True)
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _teardown(cfg, started)


def _setter(stop: threading.Event) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    return handler


def _teardown(cfg: ClusterConfig, started: bool) -> None:
    import ray
    from ray import serve

    try:
        if started:
            serve.shutdown()  # type: ignore[no-untyped-call]
        else:
            serve.delete(cfg.ray.app_name)
    except Exception:
        log.exception("stopping the Serve app failed")
    if started:
        ray.shutdown()


__all__ = ["add_arguments", "plan_text", "run_cluster_up", "topology_text"]
