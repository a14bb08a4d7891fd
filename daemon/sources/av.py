"""RTSP cameras and video files decoded by PyAV (FFmpeg) into BGR pixels; no JPEG re-encode.

With ``packets=True`` (the GPU path with NVDEC) an H.264/H.265 stream is not decoded here: every access unit goes
on as an Annex-B ``VideoPacket`` (MP4/MKV's length-prefixed packets through FFmpeg's ``*_mp4toannexb`` filter; an
Annex-B stream whose parameter sets came out of band, e.g. RTSP's SDP, gets them again before each keyframe).
Every packet is forwarded, since an inter-coded stream needs all of them decoded: a frame the fps cap skips is
marked ``decode_only``. A demux session (an RTSP connection, one play of a file) starts at its first keyframe: the
packets before it reference pictures the decoder never had, so they are dropped and counted
(``skipped_before_key``), and the keyframe is marked ``new_session`` (the GPU side flushes the camera's decoder and
makes a new one). Each packet carries the stream's colour tags (``stream_colour``). Other codecs are decoded to
pixels as without ``packets``.

Live URLs (rtsp://, rtsps://, ...) are supervised: open/read failures and dropped streams back off and reconnect,
and FFmpeg's socket timeout plus PyAV's own open/read timeout keep a dead camera from hanging the thread.
Local files fail for good when they cannot be opened; ``realtime`` paces them at their timestamps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from daemon.sources.backoff import Backoff, log_worthy
from daemon.sources.base import Sink, Source, SourceError, redact_url
from daemon.types import VIDEO_CODECS, VideoPacket

log = logging.getLogger(__name__)

LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "udp", "tcp", "srt", "rtp"})
RTSP_DEFAULTS = {"rtsp_transport": "tcp"}
MAX_BAD_PACKETS = 100  # consecutive undecodable packets before the stream is reopened
MAX_LAG_S = 1.0
UNSPECIFIED = 2  # AVCOL_SPC_UNSPECIFIED
FULL_RANGE = 2  # AVCOL_RANGE_JPEG


class AvSource(Source):
    """A video stream through PyAV. ``options`` go to FFmpeg's demuxer (e.g. ``rtsp_transport``, ``timeout``
    in microseconds); RTSP gets ``rtsp_transport=tcp`` and a socket timeout of ``timeout_s`` unless given."""

    def __init__(
        self,
        camera: str,
        url: str,
        sink: Sink,
        options: Mapping[str, str] | None = None,
        max_fps: float | None = None,
        realtime: bool = False,
        loop: bool = False,
        timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        packets: bool = False,
    ) -> None:
        super().__init__(camera, sink, max_fps=max_fps, backoff=Backoff(backoff_initial_s, backoff_max_s))
        if not url:
            raise ValueError(f"camera {camera!r}: empty url")
        if not timeout_s > 0:
            raise ValueError(f"camera {camera!r}: timeout_s must be > 0, got {timeout_s}")
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        self._url = url
        self._safe_url = redact_url(url) if scheme else url
        self._password = urlsplit(url).password if scheme else None
        self._live = scheme in LIVE_SCHEMES
        self._timeout = timeout_s
        opts: dict[str, str] = {}
        if scheme.startswith("rtsp"):
            opts.update(RTSP_DEFAULTS)
            opts["timeout"] = str(int(timeout_s * 1_000_000))
        opts.update(options or {})
        self._options = opts
        self._realtime = realtime
        self._loop = loop
        self._packets = packets
        self._mode_logged = False
        self._skipped_before_key = 0

    @property
    def packets(self) -> bool:
        """Whether H.264/H.265 streams go on as packets (GPU decode) instead of pixels."""
        return self._packets

    @property
    def skipped_before_key(self) -> int:
        """Packets dropped because their session (a reconnect, a new play of a file) had no keyframe yet."""
        with self._lock:
            return self._skipped_before_key

    @property
    def options(self) -> dict[str, str]:
        """The FFmpeg options used to open the stream (a copy)."""
        return dict(self._options)

    # -- running ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        log.info("camera %s: opening %s", self.camera, self._safe_url)
        if self._live:
            self._supervise(self._play_once, "stream ended")
            return
        try:
            if not Path(self._url).exists():
                raise SourceError(f"video file {self._url} does not exist")
            while True:
                self._play_once()
                if self._stopping:
                    return
                if not self._loop:
                    self._end(f"end of {Path(self._url).name}")
                    return
        except SourceError as exc:
            self._fail(str(exc))

    def _describe(self, exc: BaseException) -> str:
        text = self._scrub(super()._describe(exc)).replace(f": '{self._safe_url}'", "")
        return f"{self._safe_url}: {text}"

    def _scrub(self, text: str) -> str:
        text = text.replace(self._url, self._safe_url)
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def _open(self) -> Any:
        import av

        try:
            return av.open(self._url, options=dict(self._options), timeout=(self._timeout, self._timeout))
        except av.error.FFmpegError as exc:
            if self._live:
                raise
            raise SourceError(f"cannot open {self._url} as a video: {self._scrub(str(exc))}") from exc

    def _play_once(self) -> None:
        """Open, decode every frame until the end of the stream or stop, close."""
        container = self._open()
        try:
            if not container.streams.video:
                raise SourceError(f"{self._safe_url} has no video stream")
            stream = container.streams.video[0]
            if self._packet_mode(stream):
                self._demux_packets(container, stream)
                return
            stream.thread_type = "AUTO"
            self._decode(container, stream)
        finally:
            container.close()

    def _decode(self, container: Any, stream: Any) -> None:
        import av

        bad = 0
        decoded = 0
        t0 = time.monotonic()
        first_ts: float | None = None
        for packet in container.demux(stream):
            if self._stopping:
                return
            self._add_bytes(packet.size)
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as exc:
                bad += 1
                self._reject(f"undecodable packet: {exc}")
                if bad >= MAX_BAD_PACKETS:
                    raise ConnectionError(f"{bad} undecodable packets in a row") from exc
                continue
            bad = 0
            for frame in frames:
                if self._realtime and not self._live:
                    ts = float(frame.time) if frame.time is not None else decoded / float(stream.average_rate or 25)
                    first_ts = ts if first_ts is None else first_ts
                    t0 = self._pace(t0, ts - first_ts)
                    if self._stopping:
                        return
                decoded += 1
                mono = self._admit()
                if mono is not None:
                    self._push_pixels(frame.to_ndarray(format="bgr24"), mono)
        if decoded == 0 and not self._live:
            raise SourceError(f"no frame could be decoded from {self._url}")

    def _packet_mode(self, stream: Any) -> bool:
        """Whether this stream goes on as packets; the choice and its reason are logged once per source."""
        if not self._packets:
            return False
        ctx = stream.codec_context
        codec, w, h = str(ctx.name), int(ctx.width or 0), int(ctx.height or 0)
        why = ""
        if codec not in VIDEO_CODECS:
            why = f"codec {codec} is not {'/'.join(VIDEO_CODECS)}: decoded on the CPU"
        elif w <= 0 or h <= 0:
            why = f"{codec} stream of unknown size: decoded on the CPU"
        if not self._mode_logged:
            self._mode_logged = True
            if why:
                log.info("camera %s: %s", self.camera, why)
            else:
                log.info("camera %s: %s %dx%d packets go to the GPU decoder (NVDEC)", self.camera, codec, w, h)
        return not why

    def _demux_packets(self, container: Any, stream: Any) -> None:
        """Forward every access unit as an Annex-B packet until the end of the stream or stop."""
        ctx = stream.codec_context
        codec, w, h = str(ctx.name), int(ctx.width), int(ctx.height)
        extra = bytes(ctx.extradata or b"")
        annexb = annexb_start(extra)
        bsf = None
        if extra and not annexb:
            import av

            bsf = av.BitStreamFilterContext(f"{codec}_mp4toannexb", stream)
        prefix = extra if annexb else b""
        colour = stream_colour(ctx)
        rate = float(stream.average_rate or 25)
        sent = 0
        t0 = time.monotonic()
        first_ts: float | None = None
        for packet in container.demux(stream):
            if self._stopping:
                return
            if packet.size == 0:
                continue
            self._add_bytes(packet.size)
            for p in bsf.filter(packet) if bsf is not None else (packet,):
                key = bool(p.is_keyframe)
                if not sent and not key:  # a session starts at a keyframe: the decoder has no references yet
                    self._skip_before_key()
                    continue
                if self._realtime and not self._live:
                    ts = float(p.pts * p.time_base) if p.pts is not None and p.time_base else sent / rate
                    first_ts = ts if first_ts is None else first_ts
                    t0 = self._pace(t0, ts - first_ts)
                    if self._stopping:
                        return
                data = bytes(p)
                if key and prefix and not has_parameter_sets(codec, data):
                    data = prefix + data
                mono = self._admit()
                self._push_packet(VideoPacket(codec, data, key, w, h, mono is None, *colour, new_session=not sent),
                                  time.monotonic() if mono is None else mono)
                sent += 1
        if sent == 0 and not self._live:
            raise SourceError(f"no packet could be read from {self._url}")

    def _skip_before_key(self) -> None:
        """A packet before the session's first keyframe: dropped (it references pictures of no session here),
        counted as ``skipped_before_key``, logged on the 1st, 2nd, 4th... occurrence."""
        with self._lock:
            self._skipped_before_key += 1
            n = self._skipped_before_key
        if log_worthy(n):
            log.info("camera %s: packet dropped before the stream's first keyframe [%d so far]", self.camera, n)

    def _pace(self, t0: float, offset: float) -> float:
        """Wait until ``t0 + offset``; returns the (possibly restarted) schedule origin."""
        lag = time.monotonic() - (t0 + offset)
        if lag > MAX_LAG_S:
            return time.monotonic() - offset
        if lag < 0:
            self._wait(-lag)
        return t0


def stream_colour(ctx: Any) -> tuple[int, bool]:
    """(AVColorSpace number, full range) of a video stream's codec context: the tags the CPU path's swscale
    honours (full range also where the decoder picks a yuvj* format)."""
    full = int(ctx.color_range or 0) == FULL_RANGE or str(ctx.pix_fmt or "").startswith("yuvj")
    return int(ctx.colorspace if ctx.colorspace is not None else UNSPECIFIED), full


def annexb_start(data: bytes) -> bool:
    """Whether ``data`` starts with an Annex-B start code (00 00 01 or 00 00 00 01)."""
    return data.startswith(b"\x00\x00\x01") or data.startswith(b"\x00\x00\x00\x01")


def has_parameter_sets(codec: str, data: bytes) -> bool:
    """Whether an Annex-B access unit carries its sequence parameter set in band (H.264 SPS, NAL type 7; H.265
    VPS/SPS, types 32/33). Parameter sets come before the first slice, so the scan stops there."""
    hevc = codec == "hevc"
    i = data.find(b"\x00\x00\x01")
    while 0 <= i < len(data) - 3:
        b = data[i + 3]
        kind = (b >> 1) & 0x3F if hevc else b & 0x1F
        if kind in ((32, 33) if hevc else (7,)):
            return True
        if (hevc and kind < 32) or (not hevc and 1 <= kind <= 5):  # a slice: no parameter set follows
            return False
        i = data.find(b"\x00\x00\x01", i + 3)
    return False
