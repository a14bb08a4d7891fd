"""A loan the guest cannot use leaves only its camera cold, never the whole batch: arrays named oddly, of a dtype or
shape no state holds, specs the lent bytes do not hold, arrays both inside the state bytes and apart (a buggy or
hostile home: a loan comes from another process), or a signature read over peer access whose copy back to the host
fails (a CUDA error). Each is refused with one clear log line (``unusable``) and the rest of the batch is served;
a handle that cannot be opened at all (no peer access) is logged once per cause, like a failed read. Real home
runtime (CPU path, real model and vtest frames), real guest pipeline, sender, order gate and ``read_shared``; the
loans are changed in transit, the CUDA calls stood in for as in test_overflow_peer_read_failed (no GPU here)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cluster.overflow.guest as overflow_guest
from cluster.messages import OverflowBatch, OverflowReply, OverflowStats
from cluster.overflow.guest import PEER_REFUSED_HOLD_S, GuestHost
from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import Config
from daemon.features.state import from_bytes, to_bytes
from daemon.gpu.ipc import ArraySpec, IpcMapping, PeerAccessError, SharedArrays
from daemon.guest import BorrowedState
from tests.test_overflow_guest import _frame, warm_home
from tests.test_overflow_order import _wait
from tests.test_overflow_peer_read_failed import CAMERAS, CUDARuntimeError, HostIpc, Pair

HANDLE_B = HostIpc.handle("b")


class DeviceArray:
    """A signature read onto the guest's device (a CuPy array) whose copy to the host fails."""

    def __init__(self, a: Any) -> None:
        self.shape = a.shape

    def get(self) -> Any:
        raise CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")


class DeviceMapping:
    def __init__(self, inner: IpcMapping) -> None:
        self._inner = inner

    def read(self, specs: Sequence[ArraySpec]) -> list[Any]:
        return [DeviceArray(a) for a in self._inner.read(specs)]

    def close(self) -> None:
        self._inner.close()


class LoanIpc(HostIpc):
    """HostIpc whose opener also refuses handles (no peer access between the GPUs) or reads arrays whose copy to
    the host fails."""

    def __init__(self, as_bytes: Sequence[str] = ()) -> None:
        super().__init__(as_bytes)
        self.no_peer: set[bytes] = set()
        self.to_host_fails: set[bytes] = set()

    def __call__(self, shared: SharedArrays, device: int | None) -> IpcMapping:
        if shared.handle in self.no_peer:
            raise PeerAccessError("GPU 1 has no peer access to GPU 0 (no NVLink or P2P between them)")
        mapping = super().__call__(shared, device)
        return DeviceMapping(mapping) if shared.handle in self.to_host_fails else mapping


Tamper = Callable[[BorrowedState, LoanIpc], BorrowedState]


class TamperLink:
    """The peer's guest_process, called directly, with camera b's loan changed in transit."""

    def __init__(self, guest: GuestHost, ipc: LoanIpc, tamper: Tamper) -> None:
        self.name = "worker-1"
        self.guest = guest
        self.ipc = ipc
        self.tamper = tamper

    def call(self, batch: OverflowBatch, timeout_s: float) -> OverflowReply:
        states = tuple(self.tamper(s, self.ipc) if s.camera == "b" else s for s in batch.states)
        return self.guest.process(dataclasses.replace(batch, states=states))


def _arrays(loan: BorrowedState) -> SharedArrays:
    assert loan.arrays is not None and loan.arrays.handle == HANDLE_B
    return loan.arrays


def _as_host(loan: BorrowedState, ipc: LoanIpc, **specs: Any) -> BorrowedState:
    """b's loan on the bytes route (arrays apart), its signature spec changed by ``specs``."""
    shared = _arrays(loan)
    sig = dataclasses.replace(shared.specs[0], **specs)
    host = SharedArrays("host", (sig,), -1, shared.pid, b"", ipc.buffers[shared.handle])
    return dataclasses.replace(loan, arrays=host)


def _feature_gap(loan: BorrowedState, ipc: LoanIpc) -> BorrowedState:
    shared = _arrays(loan)
    specs = (*shared.specs, ArraySpec("features.1", (2, 2), "float16", 0))
    return dataclasses.replace(loan, arrays=dataclasses.replace(shared, specs=specs))


def _short_bytes(loan: BorrowedState, ipc: LoanIpc) -> BorrowedState:
    host = _as_host(loan, ipc).arrays
    assert host is not None
    return dataclasses.replace(loan, arrays=dataclasses.replace(host, data=host.data[: len(host.data) // 2]))


def _doubled(loan: BorrowedState, ipc: LoanIpc) -> BorrowedState:
    state = from_bytes(loan.data, time.monotonic())
    return dataclasses.replace(loan, data=to_bytes(dataclasses.replace(state, signature=np.zeros((80, 80), np.uint8))))


TAMPERS: dict[str, tuple[Tamper, str]] = {  # how b's loan is changed, what the log line says
    "feature_gap": (_feature_gap, "lent arrays named ['signature', 'features.1']"),
    "object_dtype": (lambda loan, ipc: _as_host(loan, ipc, dtype="object"), "dtype 'object' not allowed"),
    "signature_3d": (lambda loan, ipc: _as_host(loan, ipc, shape=(80, 80, 3)), "a signature is a 2-D uint8 array"),
    "short_bytes": (_short_bytes, "do not fit the loan's 3200 bytes"),
    "doubled": (_doubled, "both inside its state bytes and apart"),
    "to_host": (lambda loan, ipc: loan, "copying the lent signature to the host failed: CUDARuntimeError"),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_path: Path, vtest_path: Path,
         cpu_engine: EngineChoice) -> Iterator[tuple[Runtime, Config, list[bytes]]]:
    yield from warm_home(tmp_path_factory.mktemp("home"), model_path, vtest_path, cpu_engine, 2, CAMERAS)


def _serve(pair: Pair, seq: int, jpeg: bytes) -> None:
    """One frame of every camera as one batch: every frame's result comes back and is published, none fails."""
    before = pair.sender.counts()["sent"]
    n = len(pair.rec.out)
    for c in CAMERAS:
        assert pair.sender.offer(_frame(c, seq, jpeg))

    def settled() -> bool:
        c = pair.sender.counts()
        return c["sent"] == before + len(CAMERAS) and c["returned"] + c["failed"] + c["late"] == c["sent"]

    _wait(settled, 60.0)
    counts = pair.sender.counts()
    assert (counts["failed"], counts["late"]) == (0, 0), "the batch failed: a loan escaped"
    assert sorted(c for c, _, _ in pair.rec.out[n:]) == list(CAMERAS)


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_loan_the_guest_cannot_use_leaves_only_that_camera_cold(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, home: tuple[Runtime, Config, list[bytes]],
    case: str,
) -> None:
    rt, cfg, jpegs = home
    tamper, said = TAMPERS[case]
    ipc = LoanIpc(as_bytes=["c"])  # a: over the peer route, b: its loan changed in transit, c: lent as bytes
    if case == "to_host":
        ipc.to_host_fails.add(HANDLE_B)
    monkeypatch.setattr(overflow_guest, "IpcExporter", lambda device: ipc)
    pair = Pair(rt, cfg, ipc, time.monotonic)
    pair.sender.set_peer(TamperLink(pair.guest, ipc, tamper))
    caplog.set_level(logging.DEBUG, logger="daemon.guest")
    try:
        _serve(pair, 400, jpegs[0])
        g = pair.guest.stats(OverflowStats())
        assert dict(g.guest_fallbacks) == {"unusable": 1} and g.guest_refused == 0
        assert g.guest_cold == 1 and sum(dict(g.guest_decisions).values()) == 2  # a and c warm, b cold
        h = pair.home.stats(OverflowStats())
        assert dict(h.home_fallbacks) == {"export_failed": 1}  # c's; b is not a peer-route refusal: no hold
        _serve(pair, 401, jpegs[1])  # the same loan again
        assert dict(pair.guest.stats(OverflowStats()).guest_fallbacks) == {"unusable": 2}
        assert sorted(ipc.opened) == sorted(ipc.closed)  # every opened handle closed
        # b's handle is opened only where its loan passed the checks (the copy to the host fails after the read)
        assert ipc.opened.count(HANDLE_B) == (2 if case == "to_host" else 0)
    finally:
        pair.stop()
    lines = [r for r in caplog.records if "camera b's borrowed state is not usable" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING, logging.DEBUG]  # once per cause at WARNING
    assert said in lines[0].getMessage()
    assert "secret-ipc-handle" not in caplog.text  # the handle maps the home's memory: never logged


def test_a_handle_that_cannot_be_opened_is_logged_once_per_cause(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, home: tuple[Runtime, Config, list[bytes]],
) -> None:
    rt, cfg, jpegs = home
    ipc = LoanIpc(as_bytes=["c"])
    ipc.no_peer |= {HostIpc.handle("a"), HANDLE_B}  # a and b: no peer access to the home's GPU, one cause
    monkeypatch.setattr(overflow_guest, "IpcExporter", lambda device: ipc)
    now = [1000.0]
    pair = Pair(rt, cfg, ipc, lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="daemon.guest")
    try:
        _serve(pair, 500, jpegs[0])  # a and b refused, cold; c served warm
        now[0] += PEER_REFUSED_HOLD_S + 1.0  # the home tries the peer route again: refused again
        _serve(pair, 501, jpegs[1])
        g = pair.guest.stats(OverflowStats())
        assert dict(g.guest_fallbacks) == {"peer_access": 4} and g.guest_refused == 4
        assert dict(pair.home.stats(OverflowStats()).home_fallbacks) == {"export_failed": 2, "peer_refused": 4}
        assert ipc.opened == []
    finally:
        pair.stop()
    lines = [r for r in caplog.records if "cannot be read over peer access" in r.getMessage()]
    assert [r.levelno for r in lines] == [logging.WARNING] + [logging.DEBUG] * 3
    assert "no peer access to GPU 0" in lines[0].getMessage()
    assert "secret-ipc-handle" not in caplog.text
