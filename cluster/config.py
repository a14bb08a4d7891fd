"""The cluster YAML: a node config template, camera groups, GPU workers, coordinator and Ray settings.

Strict like the node config (``extra="forbid"``, every field described and bounded). Each worker runs a daemon
:class:`~daemon.config.model.Config` made from the template plus every cluster camera, enabled only where the
camera's group is assigned to that worker (:func:`worker_config`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from daemon.config.base import StrictModel

# The loader's YAML-line mapping is private to it today; the lead is asked to make it public (see the report).
from daemon.config.loader import MAX_CONFIG_BYTES, ConfigError, ConfigIssue, parse_yaml_model, validation_issues
from daemon.config.model import (
    BatchingConfig,
    CameraConfig,
    Config,
    DeltaConfig,
    HttpConfig,
    LimitsConfig,
    LoggingConfig,
    ModelConfig,
    NodeConfig,
    OutputsConfig,
    StatsConfig,
    Thresholds,
    TopicSafe,
)

WORKER_PLACEHOLDER = "{worker}"
OVERFLOW_HOME_WAIT_S = 1.0  # a released camera's frames in the home's pipeline are published within this
RELEASE_READERS_S = 3.0  # a release stops the cameras' readers and drains their queues within this


class NodeTemplate(StrictModel):
    """What every worker's node config shares: the daemon config without ``cameras``.

    ``node.node`` becomes ``{node}-{worker}`` on each worker (its own MQTT root, client id, spool and last will);
    ``{worker}`` in ``outputs.jsonl.path`` or ``outputs.mqtt.spool.path`` is replaced by the worker name.
    """

    node: NodeConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    delta: DeltaConfig = Field(default_factory=DeltaConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig = Field(
        default_factory=lambda: HttpConfig(enabled=False),
        description="Per-worker HTTP endpoint (off by default in a cluster: Ray's dashboard and metrics serve)",
    )


class GroupConfig(StrictModel):
    """Cameras that always run together on one GPU (they share batches and reference caches)."""

    id: TopicSafe = Field(description="Group id, unique in the cluster (the sharding key)")
    cameras: tuple[CameraConfig, ...] = Field(min_length=1, description="The group's cameras")
    weight: float | None = Field(
        default=None, gt=0, le=1_000_000, description="Load of the group for bounded-load sharding (default: cameras)"
    )

    @property
    def load(self) -> float:
        return float(len(self.cameras)) if self.weight is None else self.weight


class OverflowSettings(StrictModel):
    """Overflow batches (cluster/overflow/): a worker whose frame queues are full sends the frames it would drop to
    its NVLink peer, which processes them against the cameras' borrowed reference caches and returns the results;
    the home publishes them in order. Comes before group spill-over (coordinator.spill_drop_fraction)."""

    enabled: bool = Field(default=False, description="Send overflow frames to the peer instead of dropping them")
    max_batch: int = Field(default=8, ge=1, le=256, description="Frames per overflow batch at most")
    max_wait_ms: float = Field(default=20.0, ge=0, le=1000, description="An overflow batch leaves after this long")
    timeout_ms: float = Field(
        default=1000.0, ge=10, le=60_000,
        description="A frame whose result is not back this long after its batch left is given up (counted as "
                    "dropped); the home's later results wait at most this long for it",
    )
    max_pending: int = Field(
        default=32, ge=1, le=4096, description="Overflow frames waiting or in flight at most; beyond: dropped"
    )
    peer_only: bool = Field(
        default=True,
        description="Only NVLink peers take overflow (false: without a live NVLink peer, the first live fail-over "
                    "partner: same node, then other nodes)",
    )
    route: Literal["auto", "peer", "host"] = Field(
        default="auto",
        description="How the borrowed reference arrays travel: peer (CUDA IPC handles read over NVLink on the "
                    "GPU path; needs all_devices_visible; a peer that cannot read them gets bytes for a while), "
                    "host (bytes), auto (bytes while no feature maps are lent: faster for the signature alone)",
    )
    all_devices_visible: bool = Field(
        default=False,
        description="Start workers with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1: each sees every GPU of its "
                    "node (CUDA IPC needs both devices) and runs on its own from ray.get_gpu_ids()",
    )


    @model_validator(mode="after")
    def _verify_route(self) -> OverflowSettings:
        if self.route == "peer" and not self.all_devices_visible:
            raise ValueError("route peer reads the home GPU's memory from the peer's process: it needs "
                             "all_devices_visible true (or route auto / host)")
        if self.max_pending < self.max_batch:
            raise ValueError(f"max_pending = {self.max_pending} is below max_batch = {self.max_batch}: a full batch "
                             "could never be pending at once")
        return self

    @property
    def release_s(self) -> float:
        """The longest a camera's release waits on overflow: its frames in the home's pipeline, then its frames at
        the peer (cluster.host ``WorkerHost.release``)."""
        return OVERFLOW_HOME_WAIT_S + (self.max_wait_ms + self.timeout_ms) / 1000.0


class WorkerSettings(StrictModel):
    """The GPU workers: one Serve deployment per GPU, one replica each."""

    count: int = Field(ge=1, le=4096, description="Number of GPU workers (deployments worker-0 ... worker-N-1)")
    num_gpus: float = Field(default=1.0, ge=0, le=1, description="GPUs per worker replica (1; 0 for CPU-only boxes)")
    num_cpus: float = Field(default=1.0, gt=0, le=256, description="CPUs reserved per worker replica (fractional ok)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray custom resources per replica, e.g. an NVLink island"
    )
    health_check_period_s: float = Field(default=2.0, gt=0, le=600, description="Serve health check period")
    health_check_timeout_s: float = Field(default=10.0, gt=0, le=600, description="Serve health check timeout")
    heartbeat_max_age_s: float = Field(
        default=10.0, gt=0, le=3600, description="check_health fails when the pipeline heartbeat is older"
    )
    graceful_shutdown_timeout_s: float = Field(default=20.0, gt=0, le=3600, description="Replica stop budget")
    max_ongoing_requests: int = Field(default=16, ge=1, le=10000, description="Concurrent calls per replica")
    overflow: OverflowSettings = Field(default_factory=OverflowSettings, description="Overflow batches to a peer")


class CoordinatorSettings(StrictModel):
    """Assignment, health polling and fail-over."""

    poll_interval_s: float = Field(default=0.5, ge=0.05, le=60, description="Seconds between worker polls")
    call_timeout_s: float = Field(default=1.0, gt=0, le=60, description="A poll not answered within this is a miss")
    misses_to_fail: int = Field(
        default=2, ge=1, le=100, description="Consecutive missed polls declaring a worker dead (a crash: at once)"
    )
    load_factor: float = Field(
        default=1.25, ge=1.0, le=10.0, description="Bounded load: no GPU takes more than ceil(c * load / GPUs)"
    )
    seq_lease: int = Field(
        default=100_000, ge=10, le=1 << 40,
        description="Message sequence numbers leased to a worker per camera at a time (see cluster/sequence.py)",
    )
    move_timeout_s: float = Field(
        default=10.0, gt=0, le=600, description="Budget of an assign or release call (sources start or stop)"
    )
    startup_grace_s: float = Field(
        default=30.0, ge=0, le=3600,
        description="At start, groups wait this long for their home worker before going elsewhere",
    )
    rebalance_after_s: float | None = Field(
        default=30.0, ge=0, le=86400,
        description="A recovered worker gets its home groups back after this long healthy (null: never)",
    )
    spill_drop_fraction: float | None = Field(
        default=None, gt=0, le=1,
        description="Spill-over: a GPU dropping more than this share of its frames over spill_window_s hands its "
                    "lightest group to an idle NVLink peer (warm: camera states move). null: off",
    )
    spill_window_s: float = Field(default=5.0, ge=0.5, le=3600, description="Window of the spill-over drop share")
    spill_hold_s: float = Field(
        default=300.0, ge=0, le=86400, description="A spilled group is not moved home for this long"
    )
    spill_return_fraction: float | None = Field(
        default=None, ge=0, le=1,
        description="A spilled group goes back home once spill_hold_s passed and its home dropped at most this "
                    "share of its frames over a whole spill window (hysteresis; null: spill_drop_fraction / 4)",
    )
    checkpoint_interval_s: float | None = Field(
        default=2.0, ge=0.2, le=3600,
        description="Warm fail-over: every worker exports its cameras' states this often and the coordinator keeps "
                    "the latest per camera, so a dead worker's cameras start warm elsewhere. null: off (cold)",
    )
    checkpoint_max_age_s: float = Field(
        default=10.0, gt=0, le=86400,
        description="A checkpoint older than this at fail-over is not used: the camera starts with a keyframe",
    )
    checkpoint_max_bytes: int = Field(
        default=256 << 20, ge=1 << 16, le=1 << 40, description="Bytes of checkpoints the coordinator keeps in all"
    )
    checkpoint_max_state_bytes: int = Field(
        default=16 << 20, ge=1 << 12, le=1 << 32, description="A camera's checkpoint above this is not kept"
    )
    checkpoint_fetch_interval_s: float = Field(
        default=0.5, ge=0.05, le=60,
        description="Seconds between checkpoint fetch rounds (a loop apart from the liveness polls: the status "
                    "carries only descriptors, the changed states are fetched with a call of their own)",
    )
    checkpoint_fetch_bytes: int = Field(
        default=64 << 20, ge=1 << 16, le=1 << 40,
        description="Checkpoint bytes fetched per round at most, over all workers (at least "
                    "checkpoint_max_state_bytes, so every state that can be kept can be fetched)",
    )
    checkpoint_fetch_timeout_s: float = Field(
        default=5.0, gt=0, le=600,
        description="A checkpoint fetch not answered within this fails; the previous checkpoints stay",
    )
    spill_backoff_max: int = Field(
        default=8, ge=1, le=64,
        description="Spill cycles: a group spilled again within spill_cycle_window_s of coming home has its hold "
                    "doubled each time, up to this factor of spill_hold_s (1: no backoff)",
    )
    spill_cycle_window_s: float = Field(
        default=60.0, ge=0, le=86400,
        description="A re-spill of a group this soon after it came home counts as a spill cycle",
    )
    spill_calm_s: float = Field(
        default=1800.0, gt=0, le=7 * 86400,
        description="A group's spill backoff halves for every this long it stays home without spilling again",
    )
    num_cpus: float = Field(default=0.1, gt=0, le=16, description="CPUs reserved for the coordinator replica")

    @model_validator(mode="after")
    def _verify_bounds(self) -> CoordinatorSettings:
        if self.checkpoint_max_state_bytes > self.checkpoint_max_bytes:
            raise ValueError(f"checkpoint_max_state_bytes {self.checkpoint_max_state_bytes} is above "
                             f"checkpoint_max_bytes {self.checkpoint_max_bytes}")
        if self.checkpoint_fetch_bytes < self.checkpoint_max_state_bytes:
            raise ValueError(f"checkpoint_fetch_bytes {self.checkpoint_fetch_bytes} is below "
                             f"checkpoint_max_state_bytes {self.checkpoint_max_state_bytes}: such a state could "
                             "never be fetched")
        if self.spill_cycle_window_s >= self.spill_calm_s:
            raise ValueError(f"spill_cycle_window_s {self.spill_cycle_window_s:g} must be below spill_calm_s "
                             f"{self.spill_calm_s:g} (a cycle is a quick return, calm a long stay home)")
        if (self.spill_return_fraction is not None and self.spill_drop_fraction is not None
                and self.spill_return_fraction >= self.spill_drop_fraction):
            raise ValueError(f"spill_return_fraction {self.spill_return_fraction:g} must be below "
                             f"spill_drop_fraction {self.spill_drop_fraction:g} (hysteresis)")
        return self

    @property
    def spill_return(self) -> float:
        """The drop share below which a spilled group may go home (hysteresis under spill_drop_fraction)."""
        if self.spill_return_fraction is not None:
            return self.spill_return_fraction
        return (self.spill_drop_fraction or 0.0) / 4.0


class RaySettings(StrictModel):
    """How `deltayolo cluster up` reaches Ray."""

    address: str | None = Field(
        default=None, description="null: start a local Ray instance; 'auto' or ray://host:port: join a cluster"
    )
    namespace: str = Field(default="deltayolo", min_length=1, max_length=64, description="Ray namespace")
    app_name: str = Field(default="deltayolo", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Serve app name")
    num_cpus: int | None = Field(default=None, ge=1, le=4096, description="Local start: CPUs (default: all)")
    num_gpus: int | None = Field(default=None, ge=0, le=4096, description="Local start: GPUs (default: detected)")
    dashboard: bool = Field(default=False, description="Local start: run the Ray dashboard (metrics, Serve view)")
    dashboard_host: str = Field(default="127.0.0.1", min_length=1, max_length=255, description="Dashboard bind host")
    dashboard_port: int = Field(default=8265, ge=1, le=65535, description="Dashboard port")
    register_topology: bool = Field(
        default=True, description="Local start: register NVLink islands as custom resources (nvlink_island_K)"
    )


class HotSettings(StrictModel):
    """Knobs changed on running workers through Serve's ``user_config`` / ``reconfigure`` (no restart)."""

    delta: DeltaConfig | None = Field(default=None, description="Delta caching settings for every camera")
    thresholds: Thresholds | None = Field(default=None, description="Detection thresholds for every camera")
    stats_interval_s: float | None = Field(default=None, ge=0.2, le=3600, description="Seconds between stats")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        default=None, description="Level of the deltayolo loggers on the workers"
    )


class ClusterConfig(StrictModel):
    """A deltayolo cluster on Ray Serve."""

    version: Literal[1] = Field(default=1, description="Cluster config format version")
    node: NodeTemplate = Field(description="Node config template shared by the workers")
    groups: tuple[GroupConfig, ...] = Field(min_length=1, description="Camera groups (never split across GPUs)")
    workers: WorkerSettings
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    hot: HotSettings = Field(default_factory=HotSettings)

    @field_validator("groups")
    @classmethod
    def _verify_groups(cls, v: tuple[GroupConfig, ...]) -> tuple[GroupConfig, ...]:
        verify_unique_groups(v)
        return v

    @model_validator(mode="after")
    def _verify_capacity(self) -> ClusterConfig:
        verify_group_fits(self)
        verify_overflow_fits_moves(self)
        return self

    def cameras(self) -> tuple[CameraConfig, ...]:
        return tuple(cam for g in self.groups for cam in g.cameras)

    def group(self, group_id: str) -> GroupConfig:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(f"unknown camera group {group_id!r}")


def verify_unique_groups(groups: tuple[GroupConfig, ...]) -> None:
    """Group ids are sharding keys and camera ids are topic elements: both unique over the whole cluster."""
    seen_groups: dict[str, int] = {}
    seen_cams: dict[str, str] = {}
    for i, g in enumerate(groups):
        if g.id in seen_groups:
            raise ValueError(f"group id {g.id!r} of groups[{i}] is already used by groups[{seen_groups[g.id]}]")
        seen_groups[g.id] = i
        for cam in g.cameras:
            if cam.id == IDLE_CAMERA:
                raise ValueError(f"camera id {IDLE_CAMERA!r} in group {g.id!r} is reserved; choose another id")
            if cam.id in seen_cams:
                raise ValueError(
                    f"camera id {cam.id!r} in group {g.id!r} is already used in group {seen_cams[cam.id]!r}"
                )
            seen_cams[cam.id] = g.id


def verify_group_fits(cfg: ClusterConfig) -> None:
    """Every group must fit the bounded load of one GPU, or sharding could never place it."""
    total = sum(g.load for g in cfg.groups)
    cap = math.ceil(cfg.coordinator.load_factor * total / cfg.workers.count)
    for g in cfg.groups:
        if g.load > cap and cfg.workers.count > 1:
            raise ValueError(
                f"group {g.id!r} has load {g.load:g}, above the per-GPU cap {cap} "
                f"(ceil(load_factor {cfg.coordinator.load_factor:g} * total {total:g} / {cfg.workers.count} GPUs)): "
                "split the group or raise coordinator.load_factor"
            )


def verify_overflow_fits_moves(cfg: ClusterConfig) -> None:
    """A release waits for the cameras' overflow frames and stops their readers: all of it within the budget of
    the release call, or the coordinator gives up on a release that would have succeeded."""
    ov = cfg.workers.overflow
    need = ov.release_s + RELEASE_READERS_S
    if ov.enabled and need >= cfg.coordinator.move_timeout_s:
        raise ValueError(
            f"coordinator.move_timeout_s = {cfg.coordinator.move_timeout_s:g} is too short for overflow: a release "
            f"may wait {need:g} s (workers.overflow.max_wait_ms {ov.max_wait_ms:g} + timeout_ms {ov.timeout_ms:g}, "
            f"plus {OVERFLOW_HOME_WAIT_S:g} s for the home's frames and {RELEASE_READERS_S:g} s to stop the "
            "readers): raise move_timeout_s or lower workers.overflow.timeout_ms"
        )


def worker_name(index: int) -> str:
    return f"worker-{index}"


def _per_worker_path(path: str | Path, worker: str) -> str:
    text = str(path)
    if WORKER_PLACEHOLDER in text:
        return text.replace(WORKER_PLACEHOLDER, worker)
    p = Path(text)
    return str(p.with_name(f"{p.stem}-{worker}{p.suffix}"))


def worker_outputs(outputs: OutputsConfig, worker: str) -> OutputsConfig:
    """Each worker writes its own files: ``{worker}`` replaced, or ``-{worker}`` added to the file stem."""
    jl = outputs.jsonl
    if jl is not None and jl.path not in (None, "-"):
        jl = jl.model_copy(update={"path": _per_worker_path(jl.path, worker)})
    mq = outputs.mqtt
    if mq is not None:
        update: dict[str, object] = {}
        if mq.spool.path is not None:
            update["spool"] = mq.spool.model_copy(update={"path": Path(_per_worker_path(mq.spool.path, worker))})
        if mq.client_id is not None:
            update["client_id"] = f"{mq.client_id}-{worker}"[:128]
        mq = mq.model_copy(update=update)
    return outputs.model_copy(update={"jsonl": jl, "mqtt": mq})


IDLE_CAMERA = "deltayolo-idle"  # reserved: the disabled placeholder of a worker with no camera (never opened)


def _idle_camera() -> CameraConfig:
    return CameraConfig.model_validate(
        {"id": IDLE_CAMERA, "enabled": False, "source": {"type": "replay", "path": "builtin:vtest"}}
    )


def worker_config(
    template: NodeTemplate, worker: str, cameras: Sequence[CameraConfig], hot: HotSettings | None = None
) -> Config:
    """The daemon config of one worker: the template with ``cameras`` (those of its groups) and the hot knobs.

    A daemon config needs a camera; a worker without groups gets one disabled placeholder (never opened)."""
    hot = hot if hot is not None else HotSettings()
    node = template.node.model_copy(update={"node": f"{template.node.node}-{worker}"[:64]})
    cams: list[CameraConfig] = []
    for cam in cameras:
        update: dict[str, object] = {}
        if hot.thresholds is not None:
            update["thresholds"] = hot.thresholds
        if hot.delta is not None:
            update["delta"] = None  # the node-wide hot delta section applies
        cams.append(cam.model_copy(update=update) if update else cam)
    stats = template.stats if hot.stats_interval_s is None else template.stats.model_copy(
        update={"interval_s": hot.stats_interval_s})
    return Config.model_validate({
        "node": node, "model": template.model, "cameras": tuple(cams) or (_idle_camera(),),
        "batching": template.batching, "delta": hot.delta or template.delta,
        "outputs": worker_outputs(template.outputs, worker), "stats": stats, "limits": template.limits,
        "logging": template.logging, "http": template.http,
    })


def parse_cluster_config(text: str, filename: str = "<cluster>") -> ClusterConfig:
    """YAML text -> ClusterConfig; every problem is a ConfigIssue naming the file line and key path."""
    return parse_yaml_model(text, filename, ClusterConfig, "cluster config")


def validate_cluster_data(data: object, filename: str = "<cluster>", node: yaml.Node | None = None) -> ClusterConfig:
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_issues(exc, node, data, filename)) from exc


def load_cluster_config(path: str | Path) -> ClusterConfig:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigIssue(str(p), 1, "", "", f"file is larger than {MAX_CONFIG_BYTES} bytes")])
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), 0, "", "", f"cannot read config: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(str(p), 1, "", "", f"not UTF-8 text: {exc.reason}")]) from exc
    return parse_cluster_config(text, str(p))
