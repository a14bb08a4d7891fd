"""The deltayolo configuration: strict sections, every field described and bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from daemon.config.base import StrictModel
from daemon.config.mqtt import MqttConfig

TopicSafe = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
          description="Letters, digits, '_' and '-' only (used in MQTT topics and file names)"),
]


class NodeConfig(StrictModel):
    """Where this box sits in the plant (ISA-95 path)."""

    site: TopicSafe = Field(description="Site (plant) name")
    area: TopicSafe = Field(description="Area inside the site")
    line: TopicSafe = Field(description="Production line")
    node: TopicSafe = Field(description="This box's name on the line")


class ModelConfig(StrictModel):
    """The YOLO model and how to run it."""

    path: str = Field(
        default="builtin:yolov8n",
        description="ONNX file of an Ultralytics YOLOv5/v8/v11 export, or 'builtin:yolov8n' (fetched by hash)",
    )
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        default="auto", description="Inference backend; auto picks the best the machine has"
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(default="fp32", description="Inference precision")
    int8_path: str | None = Field(
        default=None, description="Q/DQ INT8 ONNX made by `deltayolo calibrate`, used when precision is int8"
    )
    class_names: tuple[str, ...] | None = Field(
        default=None, description="Class names; default: from the model's metadata"
    )
    threads: int = Field(default=0, ge=0, le=256, description="CPU inference threads (0: all cores)")
    gpu_decoder: Literal["auto", "dali", "nvimgcodec"] = Field(
        default="auto", description="GPU JPEG decoder; auto: nvImageCodec where installed, else DALI"
    )
    gpu_device: int = Field(default=0, ge=0, le=63, description="CUDA device of the GPU path")
    gpu_video_decoder: Literal["auto", "nvdec", "cpu"] = Field(
        default="auto", description="H.264/H.265 file and RTSP cameras on the GPU path: auto: NVDEC (PyNvVideoCodec) "
        "where installed, else PyAV on the CPU; nvdec: NVDEC or refuse to start; cpu: PyAV on the CPU"
    )

    @model_validator(mode="after")
    def _int8_needs_file(self) -> ModelConfig:
        if self.precision == "int8" and self.int8_path is None:
            raise ValueError("precision int8 needs int8_path (make one with `deltayolo calibrate`)")
        return self


class Thresholds(StrictModel):
    """Per-camera detection thresholds."""

    confidence: float = Field(default=0.25, gt=0.0, le=1.0, description="Minimum score of a published box")
    iou: float = Field(default=0.7, gt=0.0, le=1.0, description="IoU above which NMS suppresses a box")
    classes: tuple[str, ...] | None = Field(
        default=None, description="Publish only these class names (default: all)"
    )
    max_detections: int = Field(default=300, ge=1, le=10000, description="Most boxes per frame")


class ReplaySource(StrictModel):
    """A video file or a folder of JPEGs replayed as an MJPEG camera (frames re-encoded to JPEG)."""

    type: Literal["replay"]
    path: str = Field(description="Video file, folder of .jpg files, or 'builtin:vtest'")
    fps: float | None = Field(default=None, gt=0, le=1000, description="Replay rate (default: the file's own)")
    realtime: bool = Field(default=True, description="Pace at fps; false: as fast as the pipeline takes")
    loop: bool = Field(default=True, description="Start again at the end")
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG quality of re-encoded video frames")
    preload: bool = Field(default=False, description="Encode all frames once into memory (benchmarks)")


class HttpMjpegSource(StrictModel):
    """An IP camera serving multipart/x-mixed-replace MJPEG (or single JPEG snapshots) over HTTP."""

    type: Literal["http-mjpeg"]
    url: str = Field(pattern=r"^https?://", description="http(s) URL of the stream; no credentials in it")
    username: str | None = Field(default=None, description="HTTP basic-auth user")
    password_file: Path | None = Field(default=None, description="File holding the password")
    password_env: str | None = Field(default=None, description="Environment variable holding the password")
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Connect/read timeout")

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("put credentials in username/password_file, not in the URL")
        return v


class RtspSource(StrictModel):
    """An RTSP camera (H.264/H.265) decoded with PyAV."""

    type: Literal["rtsp"]
    url: str = Field(pattern=r"^rtsps?://", description="rtsp:// URL")
    transport: Literal["tcp", "udp"] = Field(default="tcp", description="RTSP transport")
    timeout_s: float = Field(default=10.0, gt=0, le=300, description="Socket timeout")


class FileSource(StrictModel):
    """A video file decoded with PyAV (no JPEG re-encode)."""

    type: Literal["file"]
    path: str = Field(description="Video file path, or 'builtin:vtest'")
    realtime: bool = Field(default=True, description="Pace at the file's fps")
    loop: bool = Field(default=True, description="Start again at the end")


class DeltaConfig(StrictModel):
    """Adaptive delta caching: infer only what changed since the reference (skip / regions / full)."""

    enabled: bool = Field(default=False, description="Delta caching on/off")
    mode: Literal["crops", "features"] = Field(
        default="crops", description="crops: infer the changed regions' crops; features: recompute the backbone on "
        "them and run the head on the spliced reference feature maps (CPU path)"
    )
    feature_stream: bool = Field(
        default=False, description="features mode: encode each frame's feature-map change with the feature-delta "
        "codec (INT8, a refresh every 30 messages), the bytes a standby replica would receive; counted in stats"
    )
    tile: Literal[16, 32, 64] = Field(default=16, description="Tile side in model-input pixels")
    keyframe_frames: int = Field(default=10, ge=1, le=100000, description="A full frame at least every N frames")
    keyframe_s: float = Field(default=5.0, gt=0, le=3600, description="A full frame at least every T seconds")
    full_fraction: float = Field(default=0.45, gt=0, le=1, description="Changed-tile share that forces FULL")
    brightness_full: float = Field(default=20.0, gt=0, le=255, description="Global luma shift that forces FULL")
    drift_tiles: int = Field(default=3000, ge=1, le=1000000, description="Changed tiles since keyframe forcing FULL")
    margin_tiles: int = Field(default=1, ge=0, le=8, description="Tiles added around changed tiles")
    max_regions: int = Field(default=16, ge=1, le=64, description="More regions than this: FULL")
    max_area_fraction: float = Field(default=0.7, gt=0, le=1, description="Region area share forcing FULL")
    noise_k: float = Field(default=3.0, gt=0, le=100, description="Threshold = max(min_threshold, k * noise floor)")
    min_threshold: float = Field(default=6.0, gt=0, le=255, description="Smallest per-tile luma change counted")
    context_px: int = Field(default=16, ge=0, le=640, description="Context (input px) around cached boxes in regions")
    recheck_frames: int = Field(default=0, ge=0, le=100000, description="Re-infer each cached box every N frames")
    recheck_score: float = Field(default=0.0, ge=0, le=1, description="Cached boxes below: re-inferred every frame")
    ghost_frames: int = Field(default=0, ge=0, le=100000, description="Re-check a vanished low-score box's place")
    merge_gap: int = Field(default=16, ge=0, le=640, description="Regions closer than this (input px) are merged")
    align: Literal[1, 8, 16, 32, 64] = Field(default=32, description="Regions snap to this grid (32: model stride)")
    label_iou: float = Field(default=0.8, ge=0, le=1,
                             description="A crop box of a class the published box under it (IoU >= this) did not "
                                         "have is dropped, that box kept, until a FULL frame; 0: off")
    keep_cut: bool = Field(default=True, description="A published box under a crop box cut by a crop edge stays")


SourceConfig = Annotated[
    ReplaySource | HttpMjpegSource | RtspSource | FileSource, Field(discriminator="type")
]

Point = tuple[float, float]


class CameraConfig(StrictModel):
    """One camera."""

    id: TopicSafe = Field(description="Camera id, unique on this node")
    enabled: bool = Field(default=True, description="Disabled cameras are not opened")
    source: SourceConfig
    fps_cap: float | None = Field(default=None, gt=0, le=1000, description="Process at most this many fps")
    roi: tuple[int, int, int, int] | None = Field(
        default=None, description="Region of interest x1, y1, x2, y2 in source pixels; only it is inferred"
    )
    mask: tuple[tuple[Point, ...], ...] | None = Field(
        default=None, description="Polygons (source pixels) painted out before inference (nuisance areas)"
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    queue_size: int = Field(default=4, ge=1, le=1000, description="Frames buffered before the oldest is dropped")
    delta: DeltaConfig | None = Field(default=None, description="Per-camera delta settings (default: the node's)")

    @field_validator("roi")
    @classmethod
    def _roi_ordered(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None:
            x1, y1, x2, y2 = v
            if min(v) < 0 or x2 <= x1 or y2 <= y1:
                raise ValueError(f"roi must be x1, y1, x2, y2 with 0 <= x1 < x2 and 0 <= y1 < y2, got {list(v)}")
        return v

    @field_validator("mask")
    @classmethod
    def _polygons(
        cls, v: tuple[tuple[Point, ...], ...] | None
    ) -> tuple[tuple[Point, ...], ...] | None:
        for i, poly in enumerate(v or ()):
            if len(poly) < 3:
                raise ValueError(f"mask polygon {i} needs at least 3 points, got {len(poly)}")
        return v


class BatchingConfig(StrictModel):
    """How frames from many cameras form one batch."""

    max_batch: int = Field(default=8, ge=1, le=256, description="Most frames in one inference batch")
    max_wait_ms: float = Field(default=10.0, ge=0, le=1000, description="Longest wait to fill a batch")


class JsonlOutput(StrictModel):
    """Detections (and stats) as JSON lines."""

    path: str | None = Field(default=None, description="File to append to; '-' for stdout")
    include_stats: bool = Field(default=True, description="Write stats records too")
    flush_every: int = Field(default=1, ge=1, le=10000, description="Flush after this many records")


class OutputsConfig(StrictModel):
    """Where results go."""

    jsonl: JsonlOutput | None = Field(default=None, description="JSON lines output")
    mqtt: MqttConfig | None = Field(default=None, description="MQTT output for MES systems")


class StatsConfig(StrictModel):
    """Stats emission."""

    interval_s: float = Field(default=5.0, ge=0.2, le=3600, description="Seconds between stats records")
    liveness_s: float = Field(default=10.0, gt=0, le=3600, description="A camera with no frame for this long is down")


class LimitsConfig(StrictModel):
    """Guards against bad camera data."""

    max_pixels: int = Field(default=40_000_000, ge=1, le=1_000_000_000, description="Largest frame accepted")
    max_jpeg_bytes: int = Field(default=20_000_000, ge=1, le=1_000_000_000, description="Largest JPEG accepted")


class HttpConfig(StrictModel):
    """The local HTTP endpoint: /healthz, /metrics (Prometheus), /preview/{camera} (MJPEG)."""

    enabled: bool = Field(default=True, description="Serve the endpoint")
    host: str = Field(
        default="127.0.0.1", min_length=1, max_length=255, description="Bind address (loopback by default)"
    )
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port (0: any free port)")
    preview_fps: float = Field(default=2.0, gt=0, le=30, description="Preview frames per second while watched")
    max_streams: int = Field(default=8, ge=1, le=256, description="Concurrent preview streams")
    heartbeat_max_age_s: float = Field(
        default=10.0, gt=0, le=3600, description="/healthz fails when the pipeline heartbeat is older"
    )


class LoggingConfig(StrictModel):
    """Log format and levels."""

    format: Literal["plain", "json"] = Field(default="plain", description="Log line format")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Root level")
    levels: dict[str, Literal["DEBUG", "INFO", "WARNING", "ERROR"]] = Field(
        default_factory=dict, description="Per-module levels, e.g. {daemon.sources: DEBUG}"
    )


class Config(StrictModel):
    """A whole deltayolo node."""

    version: Literal[1] = Field(default=1, description="Config format version")
    node: NodeConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    cameras: tuple[CameraConfig, ...] = Field(min_length=1, description="The cameras")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    delta: DeltaConfig = Field(default_factory=DeltaConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @field_validator("cameras")
    @classmethod
    def _verify_cameras(cls, v: tuple[CameraConfig, ...]) -> tuple[CameraConfig, ...]:
        verify_unique_camera_ids(v)
        return v


def verify_unique_camera_ids(cameras: tuple[CameraConfig, ...]) -> None:
    """Camera ids name topics and files: each must be unique on the node."""
    seen: dict[str, int] = {}
    for i, cam in enumerate(cameras):
        if cam.id in seen:
            raise ValueError(f"camera id {cam.id!r} of cameras[{i}] is already used by cameras[{seen[cam.id]}]")
        seen[cam.id] = i
