"""``build_app(args)``: the Serve application for ``serve run`` / ``serve deploy`` (and ``deltayolo cluster up``).

    serve run cluster.app:build_app config=configs/cluster-example.yaml
    serve deploy configs/serve-example.yaml        # import_path: cluster.app:build_app, args: {config: ...}

``args`` holds ``config`` (a cluster YAML path) or ``cluster`` (the same config inline). The app is one worker
deployment per GPU (``worker-0`` ... ``worker-N-1``; one replica, ``num_gpus`` from the config, fractional
``num_cpus``, health checks on the pipeline heartbeat, hot knobs as ``user_config``) plus the ``coordinator``
deployment (the ingress) that holds a DeploymentHandle to each worker. One deployment per GPU (rather than one
deployment with N replicas) makes every worker addressable through a plain DeploymentHandle.

Changing the app's ``args`` (another path, or a changed inline config) rebuilds the app, and Serve restarts every
deployment of it (they share one code version): a full restart, cameras resume on new sequence leases. ``serve
deploy`` with an unchanged ``args.config`` path does not re-read the file. Hot knobs go through ``user_config``
(the cluster YAML's ``hot:`` section at build time, or per-deployment ``user_config`` overrides in the Serve
config), applied by ``reconfigure`` on the running workers without restarts. A worker's cameras arrive with its
group grants, not as bind arguments, so a coordinator restarted on its own rebuilds its view from the workers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from ray.serve import Application

from cluster.config import ClusterConfig, load_cluster_config, validate_cluster_data, worker_name
from cluster.coordinator import CoordinatorDeployment
from cluster.worker import WorkerDeployment
from daemon.config.base import StrictModel


class AppArgs(StrictModel):
    """Arguments of ``build_app``: exactly one of ``config`` and ``cluster``."""

    config: Path | None = Field(default=None, description="Cluster YAML file")
    cluster: dict[str, Any] | None = Field(default=None, description="The cluster config inline")

    @model_validator(mode="after")
    def _one_source(self) -> AppArgs:
        if (self.config is None) == (self.cluster is None):
            raise ValueError("build_app needs exactly one of 'config' (a cluster YAML path) and 'cluster' (inline)")
        return self


def load_args(args: dict[str, Any] | AppArgs) -> ClusterConfig:
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    if parsed.config is not None:
        return load_cluster_config(parsed.config)
    return validate_cluster_data(parsed.cluster, "<build_app args.cluster>")


def worker_app(cfg: ClusterConfig, index: int) -> Application:
    w = cfg.workers
    actor: dict[str, Any] = {"num_gpus": w.num_gpus, "num_cpus": w.num_cpus}
    if w.resources:
        actor["resources"] = dict(w.resources)
    if w.overflow.enabled and w.overflow.all_devices_visible:  # CUDA IPC needs both GPUs (cluster/worker.py)
        actor["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    name = worker_name(index)
    deployment = WorkerDeployment.options(
        name=name, num_replicas=1, ray_actor_options=actor, user_config=cfg.hot.model_dump(mode="json"),
        health_check_period_s=w.health_check_period_s, health_check_timeout_s=w.health_check_timeout_s,
        graceful_shutdown_timeout_s=w.graceful_shutdown_timeout_s, max_ongoing_requests=w.max_ongoing_requests,
    )
    return deployment.bind(name, cfg.node.model_dump(mode="json"), w.heartbeat_max_age_s,
                           cfg.coordinator.checkpoint_interval_s, w.overflow.model_dump(mode="json"))


def build_from_config(cfg: ClusterConfig) -> Application:
    workers = [worker_app(cfg, i) for i in range(cfg.workers.count)]
    coordinator = CoordinatorDeployment.options(
        name="coordinator", num_replicas=1, ray_actor_options={"num_cpus": cfg.coordinator.num_cpus},
    )
    return coordinator.bind(cfg.model_dump(mode="json"), *workers)


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder (``import_path: cluster.app:build_app``)."""
    return build_from_config(load_args(args))


__all__ = ["AppArgs", "build_app", "build_from_config", "load_args", "worker_app"]
