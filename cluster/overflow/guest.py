"""A worker's overflow roles around its runtime: lending states as a home, guest batches as a peer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cluster.config import OverflowSettings
from cluster.messages import OverflowBatch, OverflowReply, OverflowStats
from cluster.overflow.device import on_device
from cluster.overflow.sender import OverflowMetrics
from daemon.gpu.ipc import IpcExporter, IpcOpen, PeerAccessError, open_ipc
from daemon.guest import BorrowedState, GuestProcessor, borrow, route_of

if TYPE_CHECKING:
    from daemon.app import Runtime
    from daemon.backend import EngineChoice

log = logging.getLogger(__name__)

PEER_REFUSED_HOLD_S = 60.0  # a peer that could not read IPC-lent arrays gets bytes this long, then one more try


class GuestHost:
    """A worker's two overflow roles around its runtime: lending its cameras' states (as a home) and processing
    other workers' overflow batches (as a guest, in a pipeline of its own built at the first batch)."""

    def __init__(self, worker: str, runtime: Runtime, settings: OverflowSettings, metrics: OverflowMetrics,
                 device: int | None = None, clock: Callable[[], float] = time.monotonic,
                 open_handle: IpcOpen = open_ipc) -> None:
        self._worker = worker
        self._open_handle = open_handle  # the guest pipeline opens lent IPC handles with it (daemon.gpu.ipc)
        self._rt = runtime
        self._s = settings
        self._metrics = metrics
        self._clock = clock
        self._device = device  # the runtime's CUDA device (None: CPU path), made current where the guest builds
        self._lock = threading.Lock()  # the counters and the fields below: never held across GPU work
        self._build_lock = threading.Lock()  # one guest pipeline build at a time (seconds on a GPU)
        self._build_error: Exception | None = None  # a failed build: batches fail at once from then on
        self._proc: GuestProcessor | None = None
        self._own_engine: EngineChoice | None = None
        self._exporter: IpcExporter | None = None
        self._stopped = False
        choice = runtime.engine_choice
        gpu = choice is not None and choice.gpu_decoder is not None
        # auto: bytes, as long as no feature maps are lent (the guest runs crops mode): the 80x80 signature goes
        # faster as bytes than as a device export + IPC open + peer copy, which waits for the home's GPU
        self._peer_route = gpu and settings.route == "peer"
        self._peer_held_until: float | None = None  # the peer refused IPC-lent arrays: bytes until then (clock)
        self._frames = 0
        self._cold = 0
        self._refused = 0
        self._keyframes = 0
        self._decisions: dict[str, int] = {}
        # loans by route (peer: CUDA IPC read over NVLink, host: bytes) and fallbacks by reason, per side
        self._routes: dict[str, dict[str, int]] = {"home": {}, "guest": {}}
        self._fallbacks: dict[str, dict[str, int]] = {"home": {}, "guest": {}}

    def _note(self, table: dict[str, dict[str, int]], side: str, key: str, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            got = table[side]
            got[key] = got.get(key, 0) + n
        if table is self._routes:
            self._metrics.loan(side, key, n)
        else:
            self._metrics.fallback(side, key, n)

    # -- home -----------------------------------------------------------------------------------------------
    def lend(self, camera: str) -> BorrowedState:
        """The camera's state for a batch: reference arrays as CUDA IPC handles on the peer route, else bytes (also
        when the export fails, e.g. out of device memory, and for a while after the peer refused them)."""
        wanted = self._peer_route and not self._peer_held()
        exporter = self._ipc_exporter() if wanted else None
        if wanted and exporter is None:
            self._note(self._fallbacks, "home", "no_ipc")
        if exporter is not None:
            try:
                return self._lent(borrow(self._rt, camera, exporter))
            except Exception as exc:
                log.warning("%s: exporting camera %s's reference arrays failed (%s: %s); this batch's state goes as "
                            "bytes", self._worker, camera, type(exc).__name__, exc)
                self._note(self._fallbacks, "home", "export_failed")
        return self._lent(borrow(self._rt, camera))

    def _lent(self, loan: BorrowedState) -> BorrowedState:
        """Count a loan that carries a state by its route (the arrays' route; inside the bytes: host)."""
        if loan.data:
            self._note(self._routes, "home", route_of(loan))
        return loan

    def forget(self, cameras: Sequence[str]) -> None:
        """The cameras left this worker: their export buffers are freed."""
        exporter = self._exporter
        if exporter is not None:
            for c in cameras:
                exporter.drop(c)

    def _ipc_exporter(self) -> IpcExporter | None:
        if self._exporter is None:
            try:
                self._exporter = IpcExporter(self._rt.cfg.model.gpu_device)
            except PeerAccessError as exc:
                log.warning("%s: overflow states go as bytes: %s", self._worker, exc)
                self._peer_route = False
        return self._exporter

    def peer_refused(self, cameras: Sequence[str]) -> None:
        """The peer could not read the arrays lent over the peer route (its reply's ``refused``; those cameras ran
        cold there): counted, and states go as bytes for ``PEER_REFUSED_HOLD_S``, then the peer route is tried
        again (peer access is a property of the two GPUs, and the peer may have changed meanwhile)."""
        self._note(self._fallbacks, "home", "peer_refused", len(cameras))
        if not self._peer_route:
            return
        with self._lock:
            first = self._peer_held_until is None
            self._peer_held_until = self._clock() + PEER_REFUSED_HOLD_S
        log.log(logging.WARNING if first else logging.DEBUG, "%s: the overflow peer cannot read reference arrays "
                "over peer access (cameras %s); states go as host bytes for %.0f s, then the peer route is tried "
                "again", self._worker, ", ".join(cameras), PEER_REFUSED_HOLD_S)

    def _peer_held(self) -> bool:
        """Whether the peer route is held after a refusal (bytes meanwhile)."""
        with self._lock:
            until = self._peer_held_until
            return until is not None and self._clock() < until

    # -- guest ----------------------------------------------------------------------------------------------
    def process(self, batch: OverflowBatch) -> OverflowReply:
        proc = self._processor()
        t0 = time.perf_counter()
        with on_device(self._device):
            out = proc.process(batch.frames, batch.cameras, batch.states, self._s.timeout_ms / 1000.0)
        warm = set(out.warm)
        for loan in batch.states:
            if loan.data:
                self._note(self._routes, "guest", route_of(loan))
        self._note(self._fallbacks, "guest", "peer_access", len(out.refused) - len(out.read_failed))
        self._note(self._fallbacks, "guest", "read_failed", len(out.read_failed))
        self._note(self._fallbacks, "guest", "unusable", len(out.unusable))
        with self._lock:
            self._frames += len(out.results)
            self._refused += len(out.refused)
            self._keyframes += out.keyframes
            for r in out.results:
                if r.camera in warm:
                    self._decisions[r.decision] = self._decisions.get(r.decision, 0) + 1
                else:
                    self._cold += 1
        self._metrics.guest_frames(len(out.results))
        self._metrics.guest_latency(time.perf_counter() - t0)
        return OverflowReply(self._worker, out.results, out.errors, out.warm, out.refused, out.seconds)

    def prepare(self) -> None:
        """Build the guest pipeline now, on a thread (a GPU engine takes seconds to warm up), not at the first
        batch, whose frames would wait for it."""

        def build() -> None:
            try:
                self._processor()
            except Exception:
                log.exception("%s: the guest pipeline could not be built; overflow batches sent here fail",
                              self._worker)

        threading.Thread(target=build, name=f"guest-build:{self._worker}", daemon=True).start()

    def _processor(self) -> GuestProcessor:
        """The guest pipeline, built at the first call (the counters' lock is not held meanwhile: status polls go
        on); a build that failed is not tried again, its error is raised at once."""
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"{self._worker}: stopping, no guest batches")
            if self._proc is not None:
                return self._proc
        with self._build_lock:
            with self._lock:
                if self._proc is not None:
                    return self._proc
                if self._build_error is not None:
                    raise RuntimeError(f"{self._worker}: the guest pipeline could not be built: "
                                       f"{self._build_error}") from self._build_error
            try:
                with on_device(self._device):
                    proc, engine = self._build()
            except Exception as exc:
                with self._lock:
                    self._build_error = exc
                raise
            with self._lock:
                if not self._stopped:
                    self._proc, self._own_engine = proc, engine
                    return proc
            proc.stop(5.0)  # stopped while it was being built
            if engine is not None:
                engine.engine.close()
            raise RuntimeError(f"{self._worker}: stopping, no guest batches")

    def _build(self) -> tuple[GuestProcessor, EngineChoice | None]:
        choice = self._rt.engine_choice
        if choice is None:
            raise RuntimeError(f"{self._worker}: runtime not started")
        own: EngineChoice | None = None
        if choice.gpu_decoder is not None:  # a GPU engine is not for two pipelines at once: the guest's own
            from daemon.backend import build_engine

            own = choice = build_engine(self._rt.cfg.model, self._rt.cfg.batching.max_batch)
        proc = GuestProcessor(self._rt.cfg, choice, self._open_handle)
        try:
            proc.start()
        except Exception:
            if own is not None:
                own.engine.close()
            raise
        return proc, own

    def stats(self, base: OverflowStats) -> OverflowStats:
        with self._lock:
            return OverflowStats(base.peer, base.counts, self._frames, tuple(sorted(self._decisions.items())),
                                 self._cold, self._refused, self._keyframes, base.round_trip_ms,
                                 home_routes=tuple(sorted(self._routes["home"].items())),
                                 home_fallbacks=tuple(sorted(self._fallbacks["home"].items())),
                                 guest_routes=tuple(sorted(self._routes["guest"].items())),
                                 guest_fallbacks=tuple(sorted(self._fallbacks["guest"].items())))

    def stop(self, timeout: float) -> None:
        with self._lock:
            self._stopped = True
            proc, self._proc = self._proc, None
            engine, self._own_engine = self._own_engine, None
            exporter, self._exporter = self._exporter, None
        if proc is not None:
            proc.stop(timeout)
        if engine is not None:
            engine.engine.close()
        if exporter is not None:
            exporter.close()


__all__ = ["GuestHost"]
