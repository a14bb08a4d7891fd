"""A loan the guest cannot use leaves only its camera cold, never the whole batch, and is logged once per cause: a
handle that cannot be opened at all (no peer access between the GPUs) gives one WARNING per cause, DEBUG after,
like a failed read (test_overflow_peer_read_failed), not one per camera per batch. Real home runtime (CPU path,
real model and vtest frames), real guest pipeline, sender, order gate and ``read_shared``; the CUDA calls are
stood in for as in test_overflow_peer_read_failed (no GPU here)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import cluster.overflow.guest as overflow_guest
from cluster.messages import OverflowStats
from cluster.overflow.guest import PEER_REFUSED_HOLD_S
from daemon.app import Runtime
from daemon.backend import EngineChoice, build_engine
from daemon.config.model import Config, ModelConfig
from daemon.gpu.ipc import IpcMapping, PeerAccessError, SharedArrays
from tests.runtime_helpers import vtest_jpegs
from tests.test_overflow_guest import WARM, _config, _frame, _run_home
from tests.test_overflow_order import _wait
from tests.test_overflow_peer_read_failed import CAMERAS, HostIpc, Pair

HANDLE_B = HostIpc.handle("b")


class LoanIpc(HostIpc):
    """HostIpc whose opener also refuses handles (no peer access between the GPUs)."""

    def __init__(self, as_bytes: Sequence[str] = ()) -> None:
        super().__init__(as_bytes)
        self.no_peer: set[bytes] = set()

    def __call__(self, shared: SharedArrays, device: int | None) -> IpcMapping:
        if shared.handle in self.no_peer:
            raise PeerAccessError("GPU 1 has no peer access to GPU 0 (no NVLink or P2P between them)")
        return super().__call__(shared, device)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[EngineChoice]:
    choice = build_engine(ModelConfig(path=str(model_path), threads=1), 4)
    yield choice
    choice.engine.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, model_path: Path, vtest_path: Path,
         engine: EngineChoice) -> Iterator[tuple[Runtime, Config, list[bytes]]]:
    tmp = tmp_path_factory.mktemp("home")
    jpegs = vtest_jpegs(vtest_path, WARM + 2)
    one = _config(model_path, tmp).model_dump()
    cfg = Config.model_validate({**one, "cameras": [{**one["cameras"][0], "id": c} for c in CAMERAS]})
    rt, _ = _run_home(cfg, engine, jpegs[:WARM], tmp)  # every camera has a reference to lend
    yield rt, cfg, jpegs[WARM:]
    rt.stop(10.0)


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
