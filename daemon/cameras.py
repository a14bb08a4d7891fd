"""Camera config -> a running source (the only place that maps source config sections to constructors)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from daemon.config.model import CameraConfig, FileSource, HttpMjpegSource, ReplaySource, RtspSource
from daemon.sources.base import Source
from daemon.types import EndOfStream, Frame

log = logging.getLogger(__name__)

Sink = Callable[[Frame | EndOfStream], object]


class CameraSetupError(Exception):
    """A camera's source could not be built (bad path, unreadable secret...)."""


def resolve_builtin(path: str) -> Path:
    """'builtin:NAME' -> the file fetched by hash; anything else is a plain path."""
    if path.startswith("builtin:"):
        from daemon.models.fetch import ensure

        return ensure(path.removeprefix("builtin:"))
    return Path(path).expanduser()


def video_packets(cam: CameraConfig, gpu_video: bool) -> bool:
    """Whether a file/RTSP camera hands H.264/H.265 packets to the GPU (NVDEC) instead of decoding them itself:
    on the GPU path with NVDEC (``gpu_video``), and not for a camera with a ROI or mask (those are applied to
    host pixels)."""
    return gpu_video and isinstance(cam.source, RtspSource | FileSource) and cam.roi is None and not cam.mask


def build_source(cam: CameraConfig, sink: Sink, gpu_video: bool = False) -> Source:
    """The camera's reader; ``gpu_video``: the runtime decodes H.264/H.265 with NVDEC (see ``video_packets``)."""
    src = cam.source
    packets = video_packets(cam, gpu_video)
    if isinstance(src, ReplaySource):
        from daemon.sources.replay import ReplaySource as ReplayReader

        return ReplayReader(
            cam.id, resolve_builtin(src.path), sink, fps=src.fps, loop=src.loop, realtime=src.realtime,
            jpeg_quality=src.jpeg_quality, preload=src.preload, max_fps=cam.fps_cap,
        )
    if isinstance(src, HttpMjpegSource):
        from daemon.sources.mjpeg import HttpMjpegSource as MjpegReader

        return MjpegReader(
            cam.id, src.url, sink, timeout_s=src.timeout_s, username=src.username,
            password=_read_secret(cam.id, src.password_file, src.password_env), max_fps=cam.fps_cap,
        )
    from daemon.sources.av import AvSource

    if isinstance(src, RtspSource):
        options = {"rtsp_transport": src.transport, "timeout": str(int(src.timeout_s * 1_000_000))}
        return AvSource(cam.id, src.url, sink, options=options, max_fps=cam.fps_cap, timeout_s=src.timeout_s,
                        packets=packets)
    if isinstance(src, FileSource):
        return AvSource(
            cam.id, str(resolve_builtin(src.path)), sink, max_fps=cam.fps_cap, realtime=src.realtime, loop=src.loop,
            packets=packets,
        )
    raise CameraSetupError(f"camera {cam.id!r}: unsupported source {type(src).__name__}")


def _read_secret(camera: str, file: Path | None, env: str | None) -> str | None:
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CameraSetupError(f"camera {camera!r}: cannot read password_file {file}: {exc.strerror}") from exc
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise CameraSetupError(f"camera {camera!r}: environment variable {env} (password_env) is not set")
        return value
    return None
