"""The GPU JPEG decoders' common interface, the host-side checks every JPEG passes before it goes to one, and the
factory that builds the installed one (DALI on x86, nvImageCodec on Jetson and x86)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from daemon.decode.jpeg import DecodeError, jpeg_size
from daemon.gpu.kernels import Decoded, PinnedStaging


class GpuDecoder(Protocol):
    """``decode_into`` fills ``out[:n]`` (letterboxed model input of ``dtype``) and, when given, ``sig[:n]`` (the
    delta stage's luma signatures) on ``stream``, without waiting on the host."""

    name: str
    size: int
    max_batch: int
    dtype: Any

    def decode_into(self, jpegs: Sequence[bytes], out: Any, sig: Any | None, stream: Any,
                    staging: PinnedStaging | None = None) -> Decoded: ...


def check_jpeg(data: bytes, max_pixels: int) -> None:
    """The host-side checks of the CPU path before a JPEG goes to the GPU decoder: a readable header, a size
    within ``max_pixels``, and an EOI marker at the end (truncated frames are refused). Raises DecodeError."""
    w, h = jpeg_size(data)
    if w * h > max_pixels:
        raise DecodeError("too_large", f"JPEG of {w}x{h} = {w * h} px exceeds max_pixels {max_pixels}")
    if not data[-4096:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        raise DecodeError("corrupt", f"truncated JPEG ({len(data)} bytes): no EOI marker at the end")


def make_decoder(name: str, size: int, max_batch: int, dtype: Any, device_id: int = 0) -> GpuDecoder:
    """The GPU JPEG decoder ``name`` (dali | nvimgcodec; Capabilities.decoder says which is installed)."""
    if name == "dali":
        from daemon.gpu.dali_decode import DaliDecoder

        return DaliDecoder(size, max_batch, device_id, dtype=dtype)
    if name == "nvimgcodec":
        from daemon.gpu.nvimgcodec_decode import NvImgCodecDecoder

        return NvImgCodecDecoder(size, max_batch, device_id, dtype=dtype)
    raise ValueError(f"GPU decoder must be dali or nvimgcodec, got {name!r}")
