"""A real local Ray (2 CPUs, 2 fake GPU slots) with Serve, for the cluster tests that need one."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def local_ray() -> Iterator[int]:
    """Ray and Serve started here, stopped on exit; yields the port of Ray's Prometheus metrics endpoint."""
    import ray
    from ray import serve

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env = {"PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
    port = free_port()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, runtime_env={"env_vars": env},
             logging_level="WARNING", log_to_driver=False, _metrics_export_port=port)
    serve.start(proxy_location="Disabled")
    try:
        yield port
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
