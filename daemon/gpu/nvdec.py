"""H.264/H.265 decode on the GPU: one NVDEC decoder (NVIDIA PyNvVideoCodec) per camera, created lazily from the
first packet of its stream, fed the Annex-B access units that daemon.sources.av demuxes (``Frame.packet``), giving
back device NV12 pictures that daemon.gpu.nv12_kernel letterboxes straight into the batch buffer.

Why PyNvVideoCodec and not DALI's video input: DALI's readers own the file or stream, so they cannot take the
packets our supervised PyAV reader (reconnects, timeouts, fps cap, byte counters) already has; PyNvVideoCodec's
core decoder takes one packet at a time from any demuxer. Measured on an H200
(docs/results/2026-11-28-h200-nvdec-probe.txt and tests/test_gpu_nvdec.py, 2026-11-28, 768x576 H.264, decode +
letterbox to FP16 640): low latency (the default)
~1,500 pictures/s for 1 or 8 cameras; native pipelining ~2,700/s for one camera, ~4,800/s for eight; pictures
bit-exact with libavcodec's.

What the probe showed and this module relies on:
- ``CreateDecoder(gpuid, codec, cudacontext, cudastream, usedevicememory=True, latency=LOW)``; ``Decode(PacketData)``
  returns a list of pictures; ``PacketData.bsl_data``/``bsl`` point at the host bytes (alive during the call);
  ``pts`` comes back as the picture's ``timestamp`` (used here to find the packet's frame); an empty packet
  flagged ``CUVID_PKT_ENDOFSTREAM`` flushes: the pictures still held for reordering (B-frames) come out, in display
  order, and the decoder is not fed again (a new session or format gets a new decoder).
- A picture exports DLPack: one (h * 3 / 2, w) uint8 NV12 array, pitch = w, chroma right after the luma.
- Pictures live in a ring of two surfaces: a picture is valid only until the decoder's next ``Decode`` call, so it
  is letterboxed at once, on the decoders' own CUDA stream (the pool's, alive as long as the pool: a decoder
  keeps using the stream it was made with, and crashed when that stream was gone), so the decoder's next write is
  ordered after the read without a host wait. The caller's stream and the pool's are joined by events
  (``begin``/``end``), both ways.
- ``decode_flag = CUVID_PKT_ENDOFPICTURE`` with ``latency=LOW``: one picture out of every packet, at once (without
  the flag the parser waits for the next packet's start: one frame of latency).

Stream state per camera: a decoder starts at a keyframe; when frames of a camera were lost before reaching it (the
bounded queue dropped the oldest, seen as a gap in ``Frame.seq``) its packets are refused until the next keyframe,
instead of decoding pictures that reference missing ones. A new demux session (``VideoPacket.new_session``: an RTSP
reconnect, a file played again) or a codec or size change flushes the decoder and starts a new one; so does the
end of the camera's stream (``NvdecPool.flush``), so a file's last pictures are not lost.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from daemon.types import Frame, FrameError

log = logging.getLogger(__name__)

NVC_CODECS = {"h264": "H264", "hevc": "HEVC"}
END_OF_STREAM = 0x01  # CUVID_PKT_ENDOFSTREAM: no more data; output every picture still held
END_OF_PICTURE = 0x08  # CUVID_PKT_ENDOFPICTURE: the packet is one whole picture, output it without waiting
MAX_PENDING = 16  # packets of a camera whose picture has not come out yet (B-frame reordering needs a few)


def nvdec_status() -> tuple[bool, str]:
    """Whether NVDEC decoding through PyNvVideoCodec can be used here, and why (logged at start)."""
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return False, "PyNvVideoCodec is not installed (pip install pynvvideocodec): H.264/H.265 decoded on the CPU"
    try:
        nvc = importlib.import_module("PyNvVideoCodec")
    except Exception as exc:  # a missing driver library (libnvcuvid) raises various errors
        return False, f"PyNvVideoCodec cannot be loaded ({type(exc).__name__}: {exc}): H.264/H.265 decoded on the CPU"
    return True, f"H.264/H.265 decoded by NVDEC (PyNvVideoCodec {getattr(nvc, '__version__', '?')})"


def choose_video(wanted: str, status: tuple[bool, str]) -> tuple[bool, str]:
    """``model.gpu_video_decoder`` (auto | nvdec | cpu) and ``nvdec_status()`` -> (NVDEC on, reason). ``nvdec``
    asked for but unusable raises RuntimeError (the runtime refuses to start, saying why)."""
    usable, why = status
    if wanted == "cpu":
        return False, "gpu_video_decoder cpu: H.264/H.265 decoded by PyAV on the CPU"
    if wanted == "nvdec" and not usable:
        raise RuntimeError(f"gpu_video_decoder nvdec asked for, but {why.split(':')[0]}")
    if wanted not in ("auto", "nvdec"):
        raise ValueError(f"gpu_video_decoder must be auto, nvdec or cpu, got {wanted!r}")
    return usable, why


class PictureDecoder(Protocol):
    """The narrow decoder interface the camera state drives (PyNvVideoCodec's, or a fake in CPU tests)."""

    stream_ptr: int

    def decode(self, data: bytes, pts: int) -> list[tuple[int, Any]]:
        """Feed one access unit; the pictures that came out: (pts they were fed with, NV12 device array)."""

    def flush(self) -> list[tuple[int, Any]]:
        """End of stream: the pictures still inside."""


class NvcDecoder:
    """PyNvVideoCodec's core decoder behind ``PictureDecoder``."""

    def __init__(self, codec: str, device_id: int, stream_ptr: int, low_latency: bool = True) -> None:
        import cupy

        nvc: Any = importlib.import_module("PyNvVideoCodec")  # untyped; loads libcuda/libnvcuvid
        self._nvc = nvc
        self._cp = cupy
        self.stream_ptr = stream_ptr
        self._dec = nvc.CreateDecoder(gpuid=device_id, codec=getattr(nvc.cudaVideoCodec, NVC_CODECS[codec]),
                                      cudacontext=0, cudastream=stream_ptr, usedevicememory=True,
                                      latency=nvc.DisplayDecodeLatencyType.LOW if low_latency else
                                      nvc.DisplayDecodeLatencyType.NATIVE)
        self._flag = END_OF_PICTURE if low_latency else 0

    def decode(self, data: bytes, pts: int) -> list[tuple[int, Any]]:
        buf = np.frombuffer(data, np.uint8)
        pkt = self._nvc.PacketData()
        pkt.bsl_data = int(buf.ctypes.data)
        pkt.bsl = int(buf.size)
        pkt.pts = pts
        pkt.decode_flag = self._flag
        return self._pictures(self._dec.Decode(pkt))

    def flush(self) -> list[tuple[int, Any]]:
        pkt = self._nvc.PacketData()
        pkt.bsl_data = 0
        pkt.bsl = 0
        pkt.decode_flag = END_OF_STREAM
        return self._pictures(self._dec.Decode(pkt))

    def _pictures(self, frames: Any) -> list[tuple[int, Any]]:
        return [(int(f.timestamp), self._cp.from_dlpack(f)) for f in frames]


@dataclass(frozen=True, slots=True)
class Picture:
    """A decoded picture of ``frame`` (its packet): NV12 on the device, valid until its decoder (``owner``, kept
    alive by the picture) is fed again."""

    frame: Frame
    nv12: Any
    width: int
    height: int
    owner: Any = None


DecoderFactory = Callable[[str, int, int], PictureDecoder]  # (codec, device id, CUDA stream pointer)


class CameraDecoder:
    """One camera's stream state around its decoder: keyframe gating, seq gaps, packet -> frame matching."""

    def __init__(self, camera: str, factory: DecoderFactory, device_id: int) -> None:
        self.camera = camera
        self._factory = factory
        self._device = device_id
        self._dec: PictureDecoder | None = None
        self._format: tuple[str, int, int] | None = None
        self._pending: OrderedDict[int, Frame] = OrderedDict()
        self._last_seq: int | None = None
        self._need_key = True
        self.decoders_made = 0

    @property
    def stream_ptr(self) -> int | None:
        return None if self._dec is None else self._dec.stream_ptr

    def decode(self, frame: Frame, stream_ptr: int) -> tuple[list[Picture], list[FrameError]]:
        pkt = frame.packet
        if pkt is None:
            raise ValueError(f"camera {self.camera}: frame {frame.seq} carries no video packet")
        errors: list[FrameError] = []
        pictures: list[Picture] = []  # the old decoder's last ones, when a new one starts here
        lost = self._last_seq is not None and frame.seq != self._last_seq + 1
        self._last_seq = frame.seq
        if lost:
            self._need_key = True
        fmt = (pkt.codec, pkt.width, pkt.height)
        if pkt.key and (self._dec is None or fmt != self._format or pkt.new_session):
            pictures = self._restart(fmt, stream_ptr, errors)
        # frames the fps cap keeps from inference (decode_only) are only decoded: no error is published for them
        if self._need_key and not pkt.key:
            why = "frames were lost before it" if lost else "the stream has not reached a keyframe yet"
            if not pkt.decode_only:
                errors.append(FrameError(self.camera, frame.seq, "corrupt",
                                         f"{pkt.codec} packet skipped until the next keyframe: {why}"))
            return pictures, errors
        dec = self._dec
        if dec is None:  # closed or flushed meanwhile: wait for a keyframe again
            self._need_key = True
            if not pkt.decode_only:
                errors.append(FrameError(self.camera, frame.seq, "corrupt",
                                         "NVDEC decoder closed; waiting for a keyframe"))
            return pictures, errors
        self._need_key = False
        self._pending[frame.seq] = frame
        while len(self._pending) > MAX_PENDING:
            seq, old = self._pending.popitem(last=False)
            if old.packet is None or not old.packet.decode_only:
                errors.append(FrameError(self.camera, seq, "empty", "the decoder gave no picture for this packet"))
        try:
            out = dec.decode(pkt.data, frame.seq)
        except Exception as exc:  # PyNvVideoCodec raises RuntimeError on bitstreams it cannot parse
            self._need_key = True
            self._pending.pop(frame.seq, None)
            errors.append(FrameError(self.camera, frame.seq, "corrupt", f"NVDEC rejected the packet: {exc}"))
            return pictures, errors
        return pictures + self._match(out, dec), errors

    def _restart(self, fmt: tuple[str, int, int], stream_ptr: int, errors: list[FrameError]) -> list[Picture]:
        """A new decoder for a new session or stream format; the old one is flushed first: its last pictures."""
        pictures: list[Picture] = []
        if self._dec is not None:
            if fmt != self._format:
                log.info("camera %s: %s %dx%d -> %s %dx%d: new NVDEC decoder", self.camera,
                         *(self._format or fmt), *fmt)
            pictures, flush_errors = self.flush()
            errors += flush_errors
        self._dec = self._factory(fmt[0], self._device, stream_ptr)
        self._format = fmt
        self.decoders_made += 1
        return pictures

    def flush(self) -> tuple[list[Picture], list[FrameError]]:
        """The camera's stream ended (or a new one starts): the pictures still in the decoder, in the order it
        gives them (display order); each packet that gave none gets an error. The decoder is not fed again: the
        next keyframe makes a new one (the pictures keep the old one alive until they are dropped)."""
        dec, self._dec = self._dec, None
        self._need_key = True
        pictures: list[Picture] = []
        if dec is not None:
            try:
                pictures = self._match(dec.flush(), dec)
            except Exception as exc:  # a decoder that fails to flush loses its last pictures, reported below
                log.warning("camera %s: flushing the NVDEC decoder failed: %s", self.camera, exc)
        errors = [FrameError(self.camera, seq, "empty", "the stream ended before the decoder gave its picture")
                  for seq, f in self._pending.items() if f.packet is None or not f.packet.decode_only]
        self._pending.clear()
        return pictures, errors

    def _match(self, out: list[tuple[int, Any]], owner: PictureDecoder) -> list[Picture]:
        pictures: list[Picture] = []
        for pts, nv12 in out:
            frame = self._pending.pop(pts, None)
            if frame is None:
                log.debug("camera %s: picture with unknown pts %d dropped", self.camera, pts)
                continue
            rows, w = int(nv12.shape[0]), int(nv12.shape[1])
            pictures.append(Picture(frame, nv12, w, rows * 2 // 3, owner))
        return pictures

    def close(self) -> None:
        self._dec = None
        self._need_key = True


class NvdecPool:
    """The per-camera decoders of one GPU and the CUDA stream they all decode on (``stream``: work on a picture
    must be issued there). Used on the pipeline thread only; ``forget`` goes through it too.

    ``low_latency``: every packet's picture out of its own decode call (LOW latency + end-of-picture flag; H200,
    768x576, decode + letterbox: ~1,500 pictures/s for 1 or 8 cameras) rather than NVDEC's native pipelining
    (pictures come out a packet or more later: ~2,700/s for one camera, ~4,800/s for eight, at a frame of latency
    per camera). ``factory``/``stream``
    replace PyNvVideoCodec and the CuPy stream in CPU tests."""

    def __init__(self, device_id: int = 0, factory: DecoderFactory | None = None, stream: Any = None,
                 low_latency: bool = True) -> None:
        self._device = device_id
        self._factory: DecoderFactory = factory if factory is not None else partial(NvcDecoder,
                                                                                     low_latency=low_latency)
        self._stream = stream
        self._cams: dict[str, CameraDecoder] = {}

    @property
    def stream(self) -> Any:
        if self._stream is None:
            import cupy

            with cupy.cuda.Device(self._device):
                self._stream = cupy.cuda.Stream(non_blocking=True)
        return self._stream

    def begin(self, caller: Any) -> None:
        """Decoding work issued from now on runs after what ``caller`` (a CuPy stream) has issued so far."""
        if caller is not self.stream:
            self.stream.wait_event(caller.record())

    def end(self, caller: Any) -> None:
        """What ``caller`` issues from now on runs after the decoding and letterboxing issued so far."""
        if caller is not self.stream:
            caller.wait_event(self.stream.record())

    def decode(self, frame: Frame) -> tuple[list[Picture], list[FrameError]]:
        """Feed ``frame``'s packet to its camera's decoder (made on first use)."""
        cam = self._cams.get(frame.camera)
        if cam is None:
            cam = self._cams[frame.camera] = CameraDecoder(frame.camera, self._factory, self._device)
        return cam.decode(frame, int(self.stream.ptr))

    def flush(self, camera: str) -> tuple[list[Picture], list[FrameError]]:
        """``camera``'s stream ended: its decoder's last pictures (CameraDecoder.flush); nothing if it has none."""
        cam = self._cams.get(camera)
        return ([], []) if cam is None else cam.flush()

    def forget(self, camera: str) -> None:
        cam = self._cams.pop(camera, None)
        if cam is not None:
            cam.close()

    def close(self) -> None:
        for cam in self._cams.values():
            cam.close()
        self._cams.clear()

    def __len__(self) -> int:
        return len(self._cams)
