"""Frozen messages passed between stages. No dicts with magic keys cross a module boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

VIDEO_CODECS = ("h264", "hevc")  # what a VideoPacket may carry (NVDEC decodes both)


@dataclass(frozen=True, slots=True)
class VideoPacket:
    """One access unit of an H.264/H.265 stream, Annex-B (start codes, parameter sets in band), as demuxed.

    ``decode_only``: the fps cap skipped this frame, but an inter-coded stream needs every packet decoded, so it
    is decoded and not inferred. ``width``/``height`` are the stream's coded size as the demuxer reported it.
    ``colorspace`` (FFmpeg's AVColorSpace number; 2: unspecified) and ``full_range`` are the stream's colour tags,
    for the NV12 -> RGB conversion. ``new_session``: the first packet of a new demux session (a reconnect, a file
    played again), always a keyframe: the camera's decoder is flushed and made anew before it.
    """

    codec: str
    data: bytes
    key: bool
    width: int
    height: int
    decode_only: bool = False
    colorspace: int = 2
    full_range: bool = False
    new_session: bool = False

    def __post_init__(self) -> None:
        if self.codec not in VIDEO_CODECS:
            raise ValueError(f"video packet codec must be one of {', '.join(VIDEO_CODECS)}, got {self.codec!r}")
        if not self.data:
            raise ValueError("video packet is empty")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"video packet size must be positive, got {self.width}x{self.height}")
        if self.new_session and not self.key:
            raise ValueError("video packet starting a new session must be a keyframe")


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame as a source hands it over.

    Exactly one of ``jpeg`` (encoded bytes, what an MJPEG camera sends), ``pixels`` (BGR HxWx3 uint8, for
    sources that decode themselves, e.g. H.264 through PyAV on the CPU path) and ``packet`` (an encoded H.264/H.265
    access unit, for the GPU path's NVDEC decode) is set; a packet frame carries nothing else.
    """

    camera: str
    seq: int
    capture_time: float  # wall clock (time.time()) at capture
    capture_mono: float  # time.monotonic() at capture, for latency
    jpeg: bytes | None = None
    pixels: NDArray[np.uint8] | None = None
    packet: VideoPacket | None = None

    def __post_init__(self) -> None:
        if self.packet is not None and (self.jpeg is not None or self.pixels is not None):
            raise ValueError(f"camera {self.camera!r} frame {self.seq}: a video packet frame carries no jpeg/pixels")

    @property
    def bytes_in(self) -> int:
        """Encoded bytes received from the camera (raw frames count their pixel bytes)."""
        if self.jpeg is not None:
            return len(self.jpeg)
        if self.packet is not None:
            return len(self.packet.data)
        return 0 if self.pixels is None else int(self.pixels.nbytes)


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """A source has ended (finite replay without loop, or a permanent failure)."""

    camera: str
    reason: str


@dataclass(frozen=True, slots=True)
class Letterbox:
    """How a source image was mapped into the model input: ``model = src * scale + pad``."""

    src_w: int
    src_h: int
    scale: float
    pad_x: float
    pad_y: float


@dataclass(frozen=True, slots=True)
class Detection:
    """One box in source-image pixels."""

    class_id: int
    class_name: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float
    cached: bool = False  # reused from an earlier frame (delta caching) instead of inferred on this one
    age_s: float = 0.0  # seconds since the box was last inferred


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Seconds spent per stage for one frame (batch stages are divided evenly over the batch)."""

    queue: float = 0.0
    decode: float = 0.0
    infer: float = 0.0
    post: float = 0.0


@dataclass(frozen=True, slots=True)
class FrameResult:
    """Detections for one frame, ready to publish."""

    camera: str
    seq: int
    capture_time: float
    capture_mono: float
    width: int
    height: int
    detections: tuple[Detection, ...]
    bytes_in: int
    bytes_decoded: int
    cached: bool = False  # no inference ran for this frame: every box is reused
    cache_age_s: float = 0.0  # seconds since this camera's last full inference
    times: StageTimes = field(default_factory=StageTimes)
    decision: str = "full"  # delta caching: "full" | "regions" | "skip"
    inferred_fraction: float = 1.0  # share of the frame's pixels that went through inference
    regions: tuple[tuple[float, float, float, float], ...] = ()  # REGIONS: what was inferred, source pixels
    bytes_h2d: int = 0  # host-to-device bytes this frame cost (GPU path)
    bytes_d2h: int = 0  # device-to-host bytes this frame cost (GPU path)
    # fidelity runs only (CameraSettings.rank_floor): boxes at or under the confidence, down to the floor, cached
    # like the published ones; never published
    below: tuple[Detection, ...] = ()


@dataclass(frozen=True, slots=True)
class FrameError:
    """A frame that could not be processed (corrupt JPEG, absurd dimensions...)."""

    camera: str
    seq: int
    kind: str  # "corrupt" | "too_large" | "empty"
    message: str
