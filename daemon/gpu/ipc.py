"""A camera's reference arrays shared with another process: CUDA IPC handles read over peer access, or bytes.

The home GPU's process copies the arrays (the luma signature reference, reference feature maps) into device buffers
of its own (``IpcExporter``: one ``cudaMalloc`` per key, reused; CuPy memory-pool blocks are sub-allocations, whose
handles would name the whole pool block) and hands out their ``cudaIpcGetMemHandle`` handles (64 bytes each). A
process on an NVLink peer opens them (``cudaIpcOpenMemHandle`` with lazy peer access) and reads the arrays into its
own device memory straight over NVLink (``read_shared``); nothing crosses PCIe. Both processes must see both devices
(in Ray: ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``, see cluster/worker.py). CUDA refuses to open a handle in
the process that made it, and between devices without peer access: ``read_shared`` then raises
``PeerAccessError`` naming the devices, and callers fall back to the bytes route (``export_host``), which is also
what a CPU-only box uses. A handle that opens but whose read fails afterwards (a CUDA error in the copy, arrays the
mapping does not hold) raises ``SharedReadError``, a PeerAccessError: the same fallback. An opened handle is closed on
every path.

The exporter refreshes a key's buffer in place: a reader must be done with one export before the next of the same
key (the cluster's overflow sender keeps one batch in flight per peer).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
MAX_SHARED_BYTES = 1 << 30  # one export's arrays, in all

Route = Literal["peer", "host"]


class PeerAccessError(RuntimeError):
    """Reading the arrays over peer access is impossible here (no CuPy/GPU, same process, no peer access)."""


class SharedReadError(PeerAccessError):
    """The IPC handle opened, but reading the arrays out of it failed (a CUDA error in the copy, arrays the mapping
    does not hold) or closing it did: the reader treats it as a refusal of the peer route (bytes from then on)."""


@dataclass(frozen=True, slots=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # bytes into the export's buffer

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, slots=True)
class SharedArrays:
    """What travels between processes (pickles): the arrays' specs and either one CUDA IPC handle of the buffer
    holding them all (``route`` "peer") or their bytes (``route`` "host")."""

    route: Route
    specs: tuple[ArraySpec, ...]
    device: int = -1  # the exporting CUDA device (-1: host bytes)
    pid: int = 0  # the exporting process
    handle: bytes = b""
    data: bytes = b""

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def _layout(arrays: Sequence[tuple[str, Any]]) -> tuple[tuple[ArraySpec, ...], int]:
    specs, off = [], 0
    for name, a in arrays:
        spec = ArraySpec(name, tuple(int(x) for x in a.shape), np.dtype(a.dtype).name, off)
        specs.append(spec)
        off += -(-spec.nbytes // 256) * 256
    if off > MAX_SHARED_BYTES:
        raise ValueError(f"{off} bytes of arrays to share, above the limit {MAX_SHARED_BYTES}")
    return tuple(specs), off


def export_host(arrays: Sequence[tuple[str, Any]]) -> SharedArrays:
    """The bytes route: the arrays copied to host memory (numpy or CuPy arrays in)."""
    specs, size = _layout(arrays)
    buf = bytearray(size)
    for spec, (_, a) in zip(specs, arrays, strict=True):
        host = np.ascontiguousarray(a.get() if hasattr(a, "__cuda_array_interface__") else np.asarray(a))
        buf[spec.offset : spec.offset + spec.nbytes] = host.view(np.uint8).reshape(-1).tobytes()
    return SharedArrays("host", specs, -1, os.getpid(), b"", bytes(buf))


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise PeerAccessError("CUDA IPC needs CuPy (not installed): use the host-bytes route") from exc
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise PeerAccessError("CUDA IPC needs a GPU; none is visible: use the host-bytes route")
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise PeerAccessError(f"CUDA IPC needs a GPU ({exc}): use the host-bytes route") from exc
    return cupy


class IpcExporter:
    """Home side: per key one exportable device buffer on ``device``, refreshed by a device copy per export."""

    def __init__(self, device: int) -> None:
        self._cp = _cupy()
        self.device = device
        self._lock = threading.Lock()
        self._buffers: dict[str, tuple[int, int, bytes]] = {}  # key -> (pointer, size, IPC handle)

    def export(self, key: str, arrays: Sequence[tuple[str, Any]]) -> SharedArrays:
        """Copy ``arrays`` (CuPy on any device, or numpy) into ``key``'s buffer; its handle and the specs."""
        cp = self._cp
        specs, size = _layout(arrays)
        with self._lock, cp.cuda.Device(self.device):
            ptr, cap, handle = self._buffers.get(key, (0, 0, b""))
            if cap < max(size, 1):
                if ptr:
                    cp.cuda.runtime.free(ptr)
                cap = max(size, 4096)
                ptr = cp.cuda.runtime.malloc(cap)
                handle = bytes(cp.cuda.runtime.ipcGetMemHandle(ptr))
                self._buffers[key] = (ptr, cap, handle)
            mem = cp.cuda.UnownedMemory(ptr, cap, self, self.device)
            buf = cp.ndarray((cap,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))
            for spec, (_, a) in zip(specs, arrays, strict=True):
                dst = buf[spec.offset : spec.offset + spec.nbytes]
                if hasattr(a, "__cuda_array_interface__"):
                    dst[...] = cp.ascontiguousarray(a).view(cp.uint8).reshape(-1)  # device (peer) copy
                else:
                    dst.set(np.ascontiguousarray(a).view(np.uint8).reshape(-1))
            cp.cuda.get_current_stream().synchronize()  # the reader is another process: the copies must be done
        return SharedArrays("peer", specs, self.device, os.getpid(), handle)

    def drop(self, key: str) -> None:
        with self._lock:
            ptr = self._buffers.pop(key, (0, 0, b""))[0]
            if ptr:
                with self._cp.cuda.Device(self.device):
                    self._cp.cuda.runtime.free(ptr)

    def close(self) -> None:
        for key in list(self._buffers):
            self.drop(key)


def check_peer(reader: int, exporter: int) -> None:
    """Raise PeerAccessError unless device ``reader`` can read device ``exporter``'s memory."""
    cp = _cupy()
    n = cp.cuda.runtime.getDeviceCount()
    if not (0 <= reader < n and 0 <= exporter < n):
        raise PeerAccessError(f"devices {reader} and {exporter} must both be visible to this process (it sees {n}: "
                              "CUDA_VISIBLE_DEVICES hides the other one)")
    if reader != exporter and not cp.cuda.runtime.deviceCanAccessPeer(reader, exporter):
        raise PeerAccessError(f"GPU {reader} has no peer access to GPU {exporter} (no NVLink or P2P between them)")


class IpcMapping(Protocol):
    """An opened IPC handle: the exporter's buffer mapped into this process, on the reading device."""

    def read(self, specs: Sequence[ArraySpec]) -> list[Any]:
        """The arrays copied out of the mapping onto the reading device, the copies done (synchronized)."""
        ...

    def close(self) -> None:
        """Unmap the buffer (after any copy still queued from it)."""
        ...


IpcOpen = Callable[[SharedArrays, int | None], IpcMapping]  # open_ipc; tests stand in for the CUDA calls


class _CudaMapping:
    def __init__(self, cp: Any, ptr: int, size: int, device: int, owner: SharedArrays) -> None:
        self._cp = cp
        self._ptr = ptr
        self._size = size
        self._device = device
        self._owner = owner

    def read(self, specs: Sequence[ArraySpec]) -> list[Any]:
        cp = self._cp
        with cp.cuda.Device(self._device):
            mem = cp.cuda.UnownedMemory(self._ptr, self._size, self._owner, self._device)
            src = cp.ndarray((self._size,), cp.uint8, cp.cuda.MemoryPointer(mem, 0))
            out = [src[s.offset : s.offset + s.nbytes].copy().view(s.dtype).reshape(s.shape) for s in specs]
            cp.cuda.get_current_stream().synchronize()  # the copies (on this stream) done before the handle closes
        return out

    def close(self) -> None:
        cp = self._cp
        with cp.cuda.Device(self._device):
            try:  # a read that failed half-way may have left copies from the mapping queued: let them finish
                cp.cuda.get_current_stream().synchronize()
            finally:
                cp.cuda.runtime.ipcCloseMemHandle(self._ptr)


def open_ipc(shared: SharedArrays, device: int | None = None) -> IpcMapping:
    """Open ``shared``'s CUDA IPC handle on ``device`` (None: the current one). Raises PeerAccessError where that is
    impossible (no CuPy/GPU, the exporting process, no peer access, the open failed)."""
    if shared.pid == os.getpid():
        raise PeerAccessError("a CUDA IPC handle cannot be opened in the process that exported it")
    cp = _cupy()
    dev = cp.cuda.runtime.getDevice() if device is None else device
    check_peer(dev, shared.device)
    size = max((s.offset + s.nbytes for s in shared.specs), default=0)
    with cp.cuda.Device(dev):
        try:
            ptr = cp.cuda.runtime.ipcOpenMemHandle(shared.handle, IPC_LAZY_ENABLE_PEER_ACCESS)
        except cp.cuda.runtime.CUDARuntimeError as exc:
            raise PeerAccessError(f"opening the IPC handle of GPU {shared.device} (pid {shared.pid}) on GPU {dev} "
                                  f"failed: {exc}") from exc
    return _CudaMapping(cp, ptr, max(size, 1), dev, shared)


def read_shared(shared: SharedArrays, device: int | None = None, open_handle: IpcOpen = open_ipc) -> list[Any]:
    """The arrays of an export: numpy for the bytes route; for the peer route, CuPy arrays on ``device``, read from
    the exporter's memory over peer access (``open_handle``, one device copy per array). The handle is closed on
    every path once opened. Raises PeerAccessError where it cannot be opened, SharedReadError (a PeerAccessError)
    where the read (a CUDA error, arrays the mapping does not hold) or the close failed after it opened."""
    if shared.route == "host":
        view = memoryview(shared.data)
        return [np.frombuffer(view[s.offset : s.offset + s.nbytes], dtype=s.dtype).reshape(s.shape).copy()
                for s in shared.specs]
    mapping = open_handle(shared, device)
    try:
        out = mapping.read(shared.specs)
    except BaseException as exc:
        try:
            mapping.close()
        except Exception as close_exc:
            exc.add_note(f"closing the IPC handle failed too: {type(close_exc).__name__}: {close_exc}")
        if isinstance(exc, Exception):
            raise SharedReadError(_read_failed("reading", shared, exc)) from exc
        raise
    try:
        mapping.close()
    except Exception as exc:  # the arrays were read, but a mapping that does not close should not be used again
        raise SharedReadError(_read_failed("closing", shared, exc)) from exc
    return out


def _read_failed(step: str, shared: SharedArrays, exc: Exception) -> str:
    """The error's text: the exporter and the cause, never the handle (it maps the exporter's memory)."""
    return (f"{step} the arrays of GPU {shared.device} (pid {shared.pid}) after their IPC handle opened failed: "
            f"{type(exc).__name__}: {exc}")


def to_json(shared: SharedArrays) -> dict[str, Any]:
    """A JSON-able form (handles and bytes base64), for processes that talk without pickle (tools, tests)."""
    import base64

    return {"route": shared.route, "device": shared.device, "pid": shared.pid,
            "handle": base64.b64encode(shared.handle).decode(), "data": base64.b64encode(shared.data).decode(),
            "specs": [[sp.name, list(sp.shape), sp.dtype, sp.offset] for sp in shared.specs]}


def from_json(obj: dict[str, Any]) -> SharedArrays:
    import base64

    route = obj["route"]
    if route not in ("peer", "host"):
        raise ValueError(f"shared arrays route must be peer or host, got {route!r}")
    specs = tuple(ArraySpec(str(n), tuple(int(x) for x in shape), str(dt), int(off))
                  for n, shape, dt, off in obj["specs"])
    return SharedArrays(route, specs, int(obj["device"]), int(obj["pid"]), base64.b64decode(obj["handle"]),
                        base64.b64decode(obj["data"]))


def timed_read(shared: SharedArrays, device: int | None = None) -> tuple[list[Any], float]:
    """``read_shared`` and how long it took (seconds)."""
    t = time.perf_counter()
    arrays = read_shared(shared, device)
    return arrays, time.perf_counter() - t


__all__ = ["ArraySpec", "IpcExporter", "IpcMapping", "IpcOpen", "PeerAccessError", "SharedArrays", "SharedReadError",
           "check_peer", "export_host", "from_json", "open_ipc", "read_shared", "timed_read", "to_json"]
