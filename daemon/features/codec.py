"""Feature-delta codec: the changed cells of a camera's feature maps against a reference, quantized.

Wire format, version 1 (all little-endian; no pickle, no compression)::

    message  = header, tensor*
    header   = magic "DYFD" (4 bytes), version u16 = 1, kind u8 (0 delta, 1 refresh), dtype u8 (1 int8,
               2 float16), scaling u8 (0 per tensor, 1 per channel), reserved u8 = 0, tensors u16,
               seq u64 (this message), base u64 (the state it applies to; a refresh has base == seq)
    tensor   = stride u16, channels u16, height u16, width u16, cells u32,
               mask    (delta with 0 < cells < height*width only) ceil(height*width / 8) bytes: the changed cells
                       in row-major order, numpy.packbits (big bit order),
               scales  (int8 with cells > 0 only) float32 x (channels | 1),
               values  cells x channels, cell-major (the cells in mask order), int8 or float16

A delta carries ``cur - ref`` on the cells whose largest change over the channels exceeds the threshold; a
refresh carries every cell's absolute value. The receiver adds (or, for a refresh, stores) the dequantized
values. :class:`FeatureDeltaEncoder` keeps a mirror of the receiver's state and encodes against it (closed
loop), so quantization errors do not accumulate; a refresh every ``refresh_every`` messages re-syncs receivers
that joined late or missed a message, and bounds what never crossed the threshold.

Arrays may be numpy or CuPy: the mask and the quantization run where the maps live, only the payload is copied
to the host.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

DEFAULT_THRESHOLD = 0.25
MAGIC = b"DYFD"
VERSION = 1
HEADER = struct.Struct("<4sHBBBBHQQ")
TENSOR = struct.Struct("<HHHHI")
KIND_DELTA, KIND_REFRESH = 0, 1
DTYPES: dict[str, int] = {"int8": 1, "float16": 2}
ValueType = Literal["int8", "float16"]


class CodecError(Exception):
    """A message that cannot be decoded, or does not apply to the receiver's state."""


def array_module(a: Any) -> Any:
    """numpy, or cupy for arrays on a GPU (imported only then)."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy

        return cupy
    return np


def to_host(a: Any) -> NDArray[Any]:
    """A numpy copy/view of a numpy or CuPy array."""
    if hasattr(a, "__cuda_array_interface__"):
        host: NDArray[Any] = a.get()
        return host
    return np.asarray(a)


@dataclass(frozen=True, slots=True)
class TensorPart:
    stride: int
    channels: int
    height: int
    width: int
    cells: int


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    version: int
    refresh: bool
    dtype: ValueType
    per_channel: bool
    seq: int
    base: int
    tensors: tuple[TensorPart, ...]


def _quantize(xp: Any, vals: Any, dtype: ValueType, per_channel: bool) -> tuple[Any, Any]:
    """(n, C) float32 -> (scales float32 (C,) or (1,), values int8/float16 (n, C))."""
    if dtype == "float16":
        return None, vals.astype(xp.float16)
    peak = xp.abs(vals).max(axis=0) if per_channel else xp.abs(vals).max(keepdims=True)
    scales = (peak / 127.0).astype(xp.float32)
    safe = xp.where(scales > 0, scales, xp.float32(1.0))
    q = xp.clip(xp.rint(vals / safe), -127, 127).astype(xp.int8)
    return scales, q


def _dequantize(xp: Any, q: Any, scales: Any) -> Any:
    return q.astype(xp.float32) if scales is None else q.astype(xp.float32) * scales


def _tensor_bytes(xp: Any, part: TensorPart, mask: Any, scales: Any, q: Any, refresh: bool) -> bytes:
    out = [TENSOR.pack(part.stride, part.channels, part.height, part.width, part.cells)]
    if part.cells == 0:
        return out[0]
    if not refresh and part.cells < part.height * part.width:
        out.append(to_host(xp.packbits(mask.ravel())).tobytes())
    if scales is not None:
        out.append(to_host(scales).astype("<f4").tobytes())
    out.append(to_host(q).astype(q.dtype.newbyteorder("<")).tobytes())
    return b"".join(out)


def _check_pair(ref: Sequence[Any], cur: Sequence[Any]) -> None:
    if len(ref) != len(cur) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(ref, cur, strict=False)):
        raise CodecError(f"reference shapes {[tuple(a.shape) for a in ref]} differ from the maps' "
                         f"{[tuple(b.shape) for b in cur]}")


def encode(ref: Sequence[Any], cur: Sequence[Any], threshold: float, *, strides: Sequence[int] = (),
           seq: int = 1, base: int = 0, dtype: ValueType = "int8", per_channel: bool = True) -> bytes:
    """A delta message: ``cur - ref`` on the cells (of each (C, H, W) map) whose largest absolute change over
    the channels is above ``threshold``. ``strides`` label the maps (0 when not given)."""
    _check_pair(ref, cur)
    labels = list(strides) or [0] * len(cur)
    parts = [HEADER.pack(MAGIC, VERSION, KIND_DELTA, DTYPES[dtype], int(per_channel), 0, len(cur), seq, base)]
    for r, c, s in zip(ref, cur, labels, strict=True):
        xp = array_module(c)
        ch, h, w = (int(v) for v in c.shape)
        d = (c.astype(xp.float32) - r.astype(xp.float32)).reshape(ch, h * w)
        mask = xp.abs(d).max(axis=0) > threshold
        idx = xp.flatnonzero(mask)
        part = TensorPart(int(s), ch, h, w, int(idx.size))
        scales, q = _quantize(xp, d[:, idx].T, dtype, per_channel) if idx.size else (None, None)
        parts.append(_tensor_bytes(xp, part, mask, scales, q, refresh=False))
    return b"".join(parts)


def encode_refresh(cur: Sequence[Any], *, strides: Sequence[int] = (), seq: int = 1, dtype: ValueType = "int8",
                   per_channel: bool = True) -> bytes:
    """A refresh message: every cell's absolute value."""
    labels = list(strides) or [0] * len(cur)
    parts = [HEADER.pack(MAGIC, VERSION, KIND_REFRESH, DTYPES[dtype], int(per_channel), 0, len(cur), seq, seq)]
    for c, s in zip(cur, labels, strict=True):
        xp = array_module(c)
        ch, h, w = (int(v) for v in c.shape)
        part = TensorPart(int(s), ch, h, w, h * w)
        scales, q = _quantize(xp, c.astype(xp.float32).reshape(ch, h * w).T, dtype, per_channel)
        parts.append(_tensor_bytes(xp, part, None, scales, q, refresh=True))
    return b"".join(parts)


def read_header(data: bytes) -> DeltaHeader:
    """The header and the per-tensor parts of a message (checks magic, version and lengths)."""
    return _parse(data, with_payload=False)[0]


_Payload = tuple[NDArray[np.int64] | None, NDArray[np.float32] | None, NDArray[Any]]


def _parse(data: bytes, with_payload: bool) -> tuple[DeltaHeader, list[_Payload | None]]:
    if len(data) < HEADER.size:
        raise CodecError(f"feature delta of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, kind, dcode, scaling, _r, n, seq, base = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise CodecError(f"not a feature delta (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"feature delta version {version} is not supported (this reader knows {VERSION})")
    names = {v: k for k, v in DTYPES.items()}
    if dcode not in names or kind not in (KIND_DELTA, KIND_REFRESH) or scaling not in (0, 1):
        raise CodecError(f"feature delta header has kind {kind}, dtype {dcode}, scaling {scaling}")
    dtype: ValueType = "int8" if names[dcode] == "int8" else "float16"
    off, parts, payloads = HEADER.size, [], []
    for k in range(n):
        if off + TENSOR.size > len(data):
            raise CodecError(f"feature delta truncated in the header of tensor {k} at byte {off}")
        part = TensorPart(*TENSOR.unpack_from(data, off))
        off += TENSOR.size
        off, payload = _tensor_payload(data, off, part, kind == KIND_REFRESH, dtype, bool(scaling), k)
        parts.append(part)
        payloads.append(payload if with_payload else None)
    if off != len(data):
        raise CodecError(f"feature delta has {len(data) - off} bytes after its last tensor")
    return DeltaHeader(version, kind == KIND_REFRESH, dtype, bool(scaling), seq, base, tuple(parts)), payloads


def _tensor_payload(data: bytes, off: int, part: TensorPart, refresh: bool, dtype: ValueType, per_channel: bool,
                    k: int) -> tuple[int, _Payload | None]:
    cells = part.height * part.width
    if part.cells == 0:
        return off, None
    if part.cells > cells or (refresh and part.cells != cells):
        raise CodecError(f"tensor {k}: {part.cells} cells in a {part.height}x{part.width} map")
    need = (0 if refresh or part.cells == cells else (cells + 7) // 8)
    n_scales = (part.channels if per_channel else 1) if dtype == "int8" else 0
    item = 1 if dtype == "int8" else 2
    need += 4 * n_scales + part.cells * part.channels * item
    if off + need > len(data):
        raise CodecError(f"tensor {k}: needs {need} bytes at byte {off}, the message has {len(data)}")
    idx: NDArray[np.int64] | None = None
    if not refresh and part.cells < cells:
        nb = (cells + 7) // 8
        bits = np.unpackbits(np.frombuffer(data, np.uint8, nb, off))[:cells]
        idx = np.flatnonzero(bits)
        off += nb
        if idx.size != part.cells:
            raise CodecError(f"tensor {k}: mask has {idx.size} cells, header says {part.cells}")
    scales = None
    if n_scales:
        scales = np.frombuffer(data, "<f4", n_scales, off).astype(np.float32)
        off += 4 * n_scales
    vals = np.frombuffer(data, "<i1" if dtype == "int8" else "<f2", part.cells * part.channels, off)
    off += part.cells * part.channels * item
    return off, (idx, scales, vals.reshape(part.cells, part.channels))


def accumulate(state: Sequence[Any], data: bytes) -> DeltaHeader:
    """Apply a message to ``state`` (the receiver's maps, numpy or CuPy) in place; returns its header.
    A refresh overwrites every cell; a delta adds to the changed cells."""
    header, payloads = _parse(data, with_payload=True)
    if len(state) != len(header.tensors):
        raise CodecError(f"message has {len(header.tensors)} tensors, the state {len(state)}")
    for k, (s, part, payload) in enumerate(zip(state, header.tensors, payloads, strict=True)):
        if tuple(s.shape) != (part.channels, part.height, part.width):
            raise CodecError(f"tensor {k}: message is {part.channels}x{part.height}x{part.width}, state "
                             f"{tuple(s.shape)}")
        if payload is None:
            continue
        if not s.flags.c_contiguous:
            raise CodecError(f"tensor {k}: the state array must be C-contiguous to be updated in place")
        xp = array_module(s)
        idx, scales, vals = payload
        flat = s.reshape(part.channels, part.height * part.width)
        d = _dequantize(xp, xp.asarray(vals), None if scales is None else xp.asarray(scales)).T
        if idx is None:
            flat[...] = d if header.refresh else flat + d
        else:
            ii = xp.asarray(idx)
            flat[:, ii] = flat[:, ii] + d
    return header


def decode(ref: Sequence[Any] | None, data: bytes) -> tuple[DeltaHeader, list[Any]]:
    """A new copy of ``ref`` with the message applied (``ref`` may be None for a refresh)."""
    header = read_header(data)
    if ref is None:
        if not header.refresh:
            raise CodecError(f"message {header.seq} is a delta against {header.base}; a receiver with no state "
                             f"needs a refresh first")
        xp_state: list[Any] = [np.zeros((p.channels, p.height, p.width), np.float32) for p in header.tensors]
    else:
        xp_state = [array_module(r).array(r, dtype=array_module(r).float32) for r in ref]
    accumulate(xp_state, data)
    return header, xp_state


def refresh_size(shapes: Sequence[tuple[int, int, int]], dtype: ValueType = "int8", per_channel: bool = True) -> int:
    """Bytes of a refresh message for maps of these (C, H, W) shapes."""
    item = 1 if dtype == "int8" else 2
    total = HEADER.size
    for c, h, w in shapes:
        scales = (4 * (c if per_channel else 1)) if dtype == "int8" else 0
        total += TENSOR.size + scales + c * h * w * item
    return total


@dataclass(slots=True)
class CodecStats:
    messages: int = 0
    refreshes: int = 0
    bytes: int = 0
    cells_sent: int = 0
    cells_total: int = 0


class FeatureDeltaEncoder:
    """The sending side for one camera: deltas against a mirror of the receiver's state (closed loop), a
    refresh when none was sent yet, every ``refresh_every`` messages (0: never) or when a delta would not be
    smaller than a refresh."""

    def __init__(self, threshold: float, strides: Sequence[int] = (), refresh_every: int = 30,
                 dtype: ValueType = "int8", per_channel: bool = True) -> None:
        if threshold < 0 or refresh_every < 0:
            raise ValueError(f"threshold and refresh_every must be >= 0, got {threshold}, {refresh_every}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.threshold = threshold
        self.strides = tuple(strides)
        self.refresh_every = refresh_every
        self.dtype: ValueType = dtype
        self.per_channel = per_channel
        self.mirror: list[Any] | None = None
        self.seq = 0
        self.stats = CodecStats()
        self._since_refresh = 0

    def encode(self, maps: Sequence[Any], force_refresh: bool = False) -> bytes:
        """The message that brings the receiver from its last state to ``maps``; updates the mirror."""
        self.seq += 1
        due = self.mirror is None or force_refresh or (
            self.refresh_every > 0 and self._since_refresh + 1 >= self.refresh_every)
        full = refresh_size([(int(m.shape[0]), int(m.shape[1]), int(m.shape[2])) for m in maps], self.dtype,
                            self.per_channel)
        msg = b""
        if not due and self.mirror is not None:
            msg = encode(self.mirror, maps, self.threshold, strides=self.strides, seq=self.seq, base=self.seq - 1,
                         dtype=self.dtype, per_channel=self.per_channel)
            due = len(msg) >= full
        if due:
            msg = encode_refresh(maps, strides=self.strides, seq=self.seq, dtype=self.dtype,
                                 per_channel=self.per_channel)
            self.mirror = [array_module(m).zeros(m.shape, dtype=np.float32) for m in maps]
            self._since_refresh = 0
            self.stats.refreshes += 1
        else:
            self._since_refresh += 1
        header = accumulate(self.mirror or [], msg)
        self.stats.messages += 1
        self.stats.bytes += len(msg)
        self.stats.cells_sent += sum(p.cells for p in header.tensors)
        self.stats.cells_total += sum(p.height * p.width for p in header.tensors)
        return msg


def _host_zeros(shape: tuple[int, int, int]) -> NDArray[np.float32]:
    return np.zeros(shape, np.float32)


class FeatureDeltaDecoder:
    """The receiving side for one camera: applies messages in order; a delta needs the state it was made
    against (``base``), a refresh resets the state."""

    def __init__(self, allocate: Callable[[tuple[int, int, int]], Any] | None = None) -> None:
        self.maps: list[Any] | None = None
        self.seq: int | None = None
        self._allocate = allocate or _host_zeros

    def apply(self, data: bytes) -> list[Any]:
        header = read_header(data)
        if not header.refresh and (self.maps is None or header.base != self.seq):
            raise CodecError(f"delta {header.seq} applies to state {header.base}, the receiver holds "
                             f"{self.seq}: wait for the next refresh")
        if header.refresh or self.maps is None:
            self.maps = [self._allocate((p.channels, p.height, p.width)) for p in header.tensors]
        accumulate(self.maps, data)
        self.seq = header.seq
        return self.maps
