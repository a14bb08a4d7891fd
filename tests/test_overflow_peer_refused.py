"""A peer that cannot read the home's CUDA IPC handles (overflow route peer): its refusal comes back with the reply,
the home counts it (``peer_refused``) and lends the next states as bytes, trying the peer route again after a
while. Real home runtime (CPU path, real model and vtest frames), real guest pipeline, real sender and order gate;
only the home's device export is stood in for (no GPU here): its handles name this process, which CUDA refuses to
open, the situation of a guest without peer access to the home's GPU."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import cluster.overflow.guest as overflow_guest
from cluster.config import OverflowSettings
from cluster.messages import OverflowBatch, OverflowReply, OverflowStats
from cluster.metrics import MemorySink, WorkerMetrics
from cluster.overflow import OrderGate, OverflowSender
from cluster.overflow.guest import PEER_REFUSED_HOLD_S, GuestHost
from cluster.sequence import Lease, SeqBook, SequencedPublisher
from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import Config
from daemon.gpu.ipc import SharedArrays, export_host
from daemon.types import Frame
from tests.test_overflow_guest import _frame, warm_home
from tests.test_overflow_order import Recorder, _wait


class SameProcessExporter:
    """The home's IPC export without a GPU: the arrays' layout as IpcExporter makes it, a handle of this process."""

    def __init__(self, device: int) -> None:
        self.device = device

    def export(self, key: str, arrays: Sequence[tuple[str, Any]]) -> SharedArrays:
        return SharedArrays("peer", export_host(arrays).specs, self.device, os.getpid(), b"\0" * 64)

    def drop(self, key: str) -> None:
        return None

    def close(self) -> None:
        return None


class GpuHome:
    """The home runtime as GuestHost sees a GPU one (a GPU decoder: the peer route is on); its state is real."""

    def __init__(self, rt: Runtime) -> None:
        self.engine_choice = type("Choice", (), {"gpu_decoder": object()})()
        self.cfg = rt.cfg
        self.delta = rt.delta
        self.model_sha256 = rt.model_sha256


class DirectLink:
    """The peer's guest_process, called directly (in Serve: a DeploymentHandle call)."""

    def __init__(self, guest: GuestHost) -> None:
        self.name = "worker-1"
        self._guest = guest

    def call(self, batch: OverflowBatch, timeout_s: float) -> OverflowReply:
        return self._guest.process(batch)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_path: Path, vtest_path: Path,
         cpu_engine: EngineChoice) -> Iterator[tuple[Runtime, Config, list[bytes]]]:
    yield from warm_home(tmp_path_factory.mktemp("home"), model_path, vtest_path, cpu_engine, 4)


def _pair(rt: Runtime, cfg: Config, clock: Callable[[], float] | None = None,
          ) -> tuple[GuestHost, GuestHost, OverflowSender, Recorder, MemorySink]:
    settings = OverflowSettings(enabled=True, route="peer", all_devices_visible=True, max_batch=1, max_wait_ms=0,
                                timeout_ms=30_000)
    sink = MemorySink()
    extra = {} if clock is None else {"clock": clock}
    home = GuestHost("worker-0", GpuHome(rt), settings, WorkerMetrics("worker-0", sink), **extra)  # type: ignore[arg-type]
    guest = GuestHost("worker-1", rt, settings, WorkerMetrics("worker-1", MemorySink()))
    rec = Recorder()
    book = SeqBook()
    book.grant(Lease("cam", 1000, 2000))
    gate = OrderGate(SequencedPublisher([rec], book))
    cam = cfg.cameras[0]
    sender = OverflowSender("worker-0", settings, gate, home.lend, lambda c: cam if c == cam.id else None,
                            WorkerMetrics("worker-0", sink), on_refused=home.peer_refused)
    sender.set_peer(DirectLink(guest))
    sender.start()
    return home, guest, sender, rec, sink


def _overflow(sender: OverflowSender, rec: Recorder, frame: Frame) -> None:
    n = len(rec.out)
    assert sender.offer(frame)
    _wait(lambda: len(rec.out) == n + 1, 60.0)
    assert rec.out[-1][2] == frame.capture_time  # the guest's result, published by the home


def test_a_peer_refusal_is_counted_and_the_next_states_go_as_bytes(
    monkeypatch: pytest.MonkeyPatch, home: tuple[Runtime, Config, list[bytes]]
) -> None:
    rt, cfg, jpegs = home
    monkeypatch.setattr(overflow_guest, "IpcExporter", SameProcessExporter)
    lender, guest, sender, rec, sink = _pair(rt, cfg)
    try:
        _overflow(sender, rec, _frame("cam", 100, jpegs[0]))
        first = lender.stats(OverflowStats())
        assert dict(first.home_routes) == {"peer": 1}
        assert dict(first.home_fallbacks) == {"peer_refused": 1}  # the guest's refusal reached the home
        g = guest.stats(OverflowStats())
        assert dict(g.guest_fallbacks) == {"peer_access": 1} and g.guest_refused == 1 and g.guest_cold == 1

        _overflow(sender, rec, _frame("cam", 101, jpegs[1]))
        second = lender.stats(OverflowStats())
        assert dict(second.home_routes) == {"peer": 1, "host": 1}  # the next state went as bytes
        assert dict(second.home_fallbacks) == {"peer_refused": 1}
        assert sink.total("deltayolo_overflow_fallbacks_total", side="home", reason="peer_refused") == 1
        assert sink.total("deltayolo_overflow_loans_total", side="home", route="host") == 1
        g = guest.stats(OverflowStats())
        assert dict(g.guest_routes) == {"peer": 1, "host": 1} and g.guest_refused == 1
        assert g.guest_cold == 1 and sum(dict(g.guest_decisions).values()) == 1  # warm this time
    finally:
        sender.stop(2.0)
        guest.stop(5.0)


def test_the_peer_route_is_tried_again_after_the_hold(
    monkeypatch: pytest.MonkeyPatch, home: tuple[Runtime, Config, list[bytes]]
) -> None:
    rt, cfg, jpegs = home
    monkeypatch.setattr(overflow_guest, "IpcExporter", SameProcessExporter)
    now = [1000.0]
    lender, guest, sender, rec, _sink = _pair(rt, cfg, clock=lambda: now[0])
    try:
        _overflow(sender, rec, _frame("cam", 200, jpegs[0]))  # refused: held
        now[0] += PEER_REFUSED_HOLD_S - 1.0
        _overflow(sender, rec, _frame("cam", 201, jpegs[1]))  # still held: bytes
        now[0] += 2.0
        _overflow(sender, rec, _frame("cam", 202, jpegs[2]))  # the peer route again, refused again
        _overflow(sender, rec, _frame("cam", 203, jpegs[3]))  # held again
        s = lender.stats(OverflowStats())
        assert dict(s.home_routes) == {"peer": 2, "host": 2}
        assert dict(s.home_fallbacks) == {"peer_refused": 2}
        assert guest.stats(OverflowStats()).guest_refused == 2
    finally:
        sender.stop(2.0)
        guest.stop(5.0)


def test_route_auto_lends_bytes_on_the_gpu_path(home: tuple[Runtime, Config, list[bytes]]) -> None:
    """Route auto (the default) sends no IPC handles, so a peer has nothing to refuse: peer_refused stays 0."""
    rt, _cfg, _ = home
    lender = GuestHost("worker-0", GpuHome(rt), OverflowSettings(enabled=True),  # type: ignore[arg-type]
                       WorkerMetrics("worker-0", MemorySink()))
    assert lender.lend("cam").arrays is None
    assert dict(lender.stats(OverflowStats()).home_routes) == {"host": 1}
