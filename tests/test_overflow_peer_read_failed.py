"""A guest that opens the home's CUDA IPC handle but then fails to read it (a CUDA error in the device copy out of the
mapping, or a mapping that does not hold the arrays its specs name): only that camera is refused (it runs cold, the
home falls back to bytes), the rest of the batch is served, every opened handle is closed, the failure is counted
and logged once per cause. Real home runtime (CPU path, real model and vtest frames), real guest pipeline, sender,
order gate and ``read_shared``; only the CUDA calls are stood in for (no GPU here): handles name host buffers of this
process, opened and closed as recorded here, and the failure is injected at the copy after the open."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cluster.overflow.guest as overflow_guest
from cluster.config import OverflowSettings
from cluster.messages import OverflowStats
from cluster.metrics import MemorySink, WorkerMetrics
from cluster.overflow import OrderGate, OverflowSender
from cluster.overflow.guest import PEER_REFUSED_HOLD_S, GuestHost
from cluster.sequence import Lease, SeqBook, SequencedPublisher
from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import Config
from daemon.gpu.ipc import ArraySpec, IpcMapping, SharedArrays, SharedReadError, export_host, read_shared
from tests.test_overflow_guest import _frame, warm_home
from tests.test_overflow_order import Recorder, _wait
from tests.test_overflow_peer_refused import DirectLink, GpuHome

CAMERAS = ("a", "b", "c")  # a: read over the peer route; b: its read fails after the open; c: lent as bytes


class CUDARuntimeError(RuntimeError):
    """What CuPy raises for a failed CUDA call (cupy_backends.cuda.api.runtime.CUDARuntimeError, a RuntimeError)."""


class HostMapping:
    """An opened handle over host bytes: the copy as the CUDA mapping makes it (slice, view, reshape)."""

    def __init__(self, ipc: HostIpc, handle: bytes, data: bytes) -> None:
        self._ipc = ipc
        self._handle = handle
        self._buf = np.frombuffer(data, np.uint8)

    def read(self, specs: Sequence[ArraySpec]) -> list[Any]:
        if self._handle in self._ipc.copy_fails:
            raise CUDARuntimeError("cudaErrorInvalidValue: invalid argument")
        return [self._buf[s.offset : s.offset + s.nbytes].copy().view(s.dtype).reshape(s.shape) for s in specs]

    def close(self) -> None:
        self._ipc.closed.append(self._handle)
        if self._handle in self._ipc.close_fails:
            raise CUDARuntimeError("cudaErrorInvalidResourceHandle: invalid resource handle")


class HostIpc:
    """Both ends of the IPC route without a GPU: the home's exporter (its handles name host buffers of this process;
    keys in ``as_bytes`` fail to export, so the home lends them as bytes) and the guest's opener."""

    def __init__(self, as_bytes: Sequence[str] = ()) -> None:
        self.buffers: dict[bytes, bytes] = {}
        self.as_bytes = set(as_bytes)
        self.copy_fails: set[bytes] = set()  # the device copy out of these mappings fails
        self.short: set[bytes] = set()  # these mappings hold half the bytes their specs name
        self.close_fails: set[bytes] = set()
        self.opened: list[bytes] = []
        self.closed: list[bytes] = []

    @staticmethod
    def handle(key: str) -> bytes:
        return f"secret-ipc-handle:{key}".encode().ljust(64, b"\0")

    # the home's side (IpcExporter)
    def export(self, key: str, arrays: Sequence[tuple[str, Any]]) -> SharedArrays:
        if key in self.as_bytes:
            raise MemoryError("out of device memory")
        host = export_host(arrays)
        self.buffers[self.handle(key)] = host.data
        return SharedArrays("peer", host.specs, 0, os.getpid(), self.handle(key))

    def drop(self, key: str) -> None:
        self.buffers.pop(self.handle(key), None)

    def close(self) -> None:
        self.buffers.clear()

    # the guest's side (daemon.gpu.ipc.open_ipc)
    def __call__(self, shared: SharedArrays, device: int | None) -> IpcMapping:
        self.opened.append(shared.handle)
        data = self.buffers[shared.handle]
        return HostMapping(self, shared.handle, data[: len(data) // 2] if shared.handle in self.short else data)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_path: Path, vtest_path: Path,
         cpu_engine: EngineChoice) -> Iterator[tuple[Runtime, Config, list[bytes]]]:
    yield from warm_home(tmp_path_factory.mktemp("home"), model_path, vtest_path, cpu_engine, 3, CAMERAS)


class Pair:
    """A home (GuestHost lending over the peer route) and its guest, linked by a real sender and order gate."""

    def __init__(self, rt: Runtime, cfg: Config, ipc: HostIpc, clock: Callable[[], float]) -> None:
        settings = OverflowSettings(enabled=True, route="peer", all_devices_visible=True, max_batch=len(CAMERAS),
                                    max_wait_ms=1_000, timeout_ms=30_000)
        self.home_sink, self.guest_sink = MemorySink(), MemorySink()
        self.home = GuestHost("worker-0", GpuHome(rt), settings,  # type: ignore[arg-type]
                              WorkerMetrics("worker-0", self.home_sink), clock=clock)
        self.guest = GuestHost("worker-1", rt, settings, WorkerMetrics("worker-1", self.guest_sink), open_handle=ipc)
        self.rec = Recorder()
        book = SeqBook()
        for c in CAMERAS:
            book.grant(Lease(c, 1000, 2000))
        cams = {c.id: c for c in cfg.cameras}
        self.sender = OverflowSender("worker-0", settings, OrderGate(SequencedPublisher([self.rec], book)),
                                     self.home.lend, cams.get, WorkerMetrics("worker-0", self.home_sink),
                                     on_refused=self.home.peer_refused)
        self.sender.set_peer(DirectLink(self.guest))
        self.sender.start()

    def batch(self, seq: int, jpeg: bytes) -> None:
        """One frame of every camera, overflowed as one batch: each one's result is published by the home, once."""
        n = len(self.rec.out)
        frames = [_frame(c, seq, jpeg) for c in CAMERAS]
        for f in frames:
            assert self.sender.offer(f)
        _wait(lambda: len(self.rec.out) >= n + len(frames), 60.0)
        assert sorted((c, t) for c, _, t in self.rec.out[n:]) == sorted((f.camera, f.capture_time) for f in frames)

    def stop(self) -> None:
        self.sender.stop(2.0)
        self.guest.stop(5.0)


@pytest.mark.parametrize("failure", ["copy", "short"])
def test_a_read_that_fails_after_the_open_refuses_only_that_camera(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, home: tuple[Runtime, Config, list[bytes]],
    failure: str,
) -> None:
    rt, cfg, jpegs = home
    ipc = HostIpc(as_bytes=["c"])
    (ipc.copy_fails if failure == "copy" else ipc.short).add(HostIpc.handle("b"))
    monkeypatch.setattr(overflow_guest, "IpcExporter", lambda device: ipc)
    now = [1000.0]
    pair = Pair(rt, cfg, ipc, lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="daemon.guest")
    try:
        pair.batch(300, jpegs[0])  # a, b and c served: b cold
        assert sorted(ipc.opened) == sorted(ipc.closed) == [HostIpc.handle("a"), HostIpc.handle("b")]
        h = pair.home.stats(OverflowStats())
        assert dict(h.home_routes) == {"peer": 2, "host": 1}
        assert dict(h.home_fallbacks) == {"export_failed": 1, "peer_refused": 1}  # b's refusal reached the home
        g = pair.guest.stats(OverflowStats())
        assert dict(g.guest_fallbacks) == {"read_failed": 1} and g.guest_refused == 1
        assert g.guest_cold == 1 and sum(dict(g.guest_decisions).values()) == 2  # a and c warm, b cold
        assert pair.guest_sink.total("deltayolo_overflow_fallbacks_total", side="guest", reason="read_failed") == 1

        pair.batch(301, jpegs[1])  # the home holds the peer route: every state goes as bytes
        assert len(ipc.opened) == 2 and dict(pair.home.stats(OverflowStats()).home_routes) == {"peer": 2, "host": 4}

        now[0] += PEER_REFUSED_HOLD_S + 1.0  # the peer route again: b's read fails again, the same cause
        pair.batch(302, jpegs[2])
        assert sorted(ipc.opened) == sorted(ipc.closed) and len(ipc.opened) == 4
        g = pair.guest.stats(OverflowStats())
        assert dict(g.guest_fallbacks) == {"read_failed": 2} and g.guest_refused == 2
        counts = pair.sender.counts()
        assert (counts["sent"], counts["returned"], counts["failed"], counts["late"]) == (9, 9, 0, 0)
        assert len(pair.rec.out) == len({(c, s) for c, s, _ in pair.rec.out}) == 9  # none published twice
    finally:
        pair.stop()
    failed = [r for r in caplog.records if "could not be read after their IPC handle opened" in r.getMessage()]
    assert [r.levelno for r in failed] == [logging.WARNING, logging.DEBUG]  # once per cause at WARNING
    assert "camera b" in failed[0].getMessage()
    assert "secret-ipc-handle" not in caplog.text  # the handle maps the home's memory: never logged


def _shared(key: str, ipc: HostIpc) -> SharedArrays:
    return ipc.export(key, [("signature", np.arange(64, dtype=np.uint8).reshape(8, 8))])


@pytest.mark.parametrize(("copy_fails", "close_fails", "step"), [
    (True, False, "reading"), (False, True, "closing"), (True, True, "reading")])
def test_read_shared_closes_an_opened_handle_on_every_path(copy_fails: bool, close_fails: bool, step: str) -> None:
    ipc = HostIpc()
    shared = _shared("k", ipc)
    if copy_fails:
        ipc.copy_fails.add(shared.handle)
    if close_fails:
        ipc.close_fails.add(shared.handle)
    with pytest.raises(SharedReadError, match=f"^{step} the arrays of GPU 0") as err:
        read_shared(shared, 0, ipc)
    assert ipc.opened == ipc.closed == [shared.handle]
    assert isinstance(err.value.__cause__, CUDARuntimeError)
    assert "secret-ipc-handle" not in str(err.value)
    if copy_fails and close_fails:
        assert "closing the IPC handle failed too" in "".join(getattr(err.value.__cause__, "__notes__", []))

