"""Guest processing: another runtime's frames, against that camera's borrowed delta state, without owning it.

A saturated runtime (the *home*) hands frames it has no room for to a peer (the *guest*, daemon.framequeue's
overflow sink; the cluster batches and sends them). With each batch the home lends, per camera, its delta state as
it is now (``borrow``): the reference signature, noise floor, policy counters and cached detections (feature maps
on request), as DYCS bytes (daemon.features.state); on the GPU the arrays may instead travel as CUDA IPC handles
that the guest reads over peer access (daemon.gpu.ipc). The guest (``GuestProcessor``) installs the borrowed state
in a tracker of its own, runs the frames through the same pipeline code as the home (change map against the borrowed
reference, SKIP / REGIONS / FULL as the policy says, inference, merge with the cached detections) and returns the
frames' results: the payload the home publishes. The guest pipeline runs crops mode (no feature stage): cameras in
``delta.mode features`` are planned and merged as crops-mode cameras there. The home's state is not touched: what
the guest frames change stays in the guest's private copy, dropped after the batch.

A state borrowed while one of the camera's frames is still in flight at the home has no settled policy counters;
the guest then takes the reference as valid with the keyframe clock at the last inference (``borrow``), so the
guest goes on warm instead of planning a keyframe. Such a reference already holds the in-flight FULL/REGIONS
frames' pixels while the cached detections do not hold theirs yet (they come at the home's resolve): the state
carries those frames' area (``CameraState.in_flight``: the whole frame, or the union of their regions) and the
guest's tracker infers it on the camera's first frame of the batch, on top of its own change map
(DeltaTracker.import_state), so an object that appeared in an in-flight frame is not missed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from daemon.config.model import CameraConfig, Config
from daemon.delta.policy import CameraDeltaState, Decision, Verdict
from daemon.delta.tracker import DeltaTracker, params_from_config
from daemon.framequeue import FrameQueues
from daemon.gpu.ipc import (
    IpcExporter,
    IpcOpen,
    PeerAccessError,
    SharedArrays,
    SharedReadError,
    export_host,
    open_ipc,
    read_shared,
)
from daemon.lent import check_lent_arrays, signature_on_host
from daemon.pipeline.heartbeat import Heartbeat
from daemon.pipeline.settings import SettingsBoard
from daemon.types import EndOfStream, Frame, FrameError, FrameResult, Letterbox

if TYPE_CHECKING:
    from daemon.app import Runtime
    from daemon.backend import EngineChoice
    from daemon.features.state import CameraState
    from daemon.pipeline.runner import PipelineRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BorrowedState:
    """A camera's delta state lent for one batch. ``data``: DYCS bytes (b"": delta caching is off for the camera,
    the guest runs every frame FULL); ``arrays``: the signature and feature maps when they travel apart from the
    bytes (route "peer": CUDA IPC handles; "host": bytes), else None (they are inside ``data``)."""

    camera: str
    data: bytes
    arrays: SharedArrays | None = None

    @property
    def nbytes(self) -> int:
        return len(self.data) + (0 if self.arrays is None else self.arrays.nbytes)


def route_of(loan: BorrowedState) -> str:
    """The route a loan's arrays took: "peer" (CUDA IPC handles) or "host" (bytes, inside the DYCS or apart)."""
    return "host" if loan.arrays is None else str(loan.arrays.route)


def lendable(state: CameraState) -> CameraState:
    """The state a guest can plan against: a reference exported while a frame was in flight has default policy
    counters (no reference); the guest takes it as a reference with the keyframe clock at the last inference."""
    if state.signature is None or state.policy.has_reference:
        return state
    return dataclasses.replace(state, policy=CameraDeltaState(True, 0, state.last_inferred, 0))


def borrow(runtime: Runtime, camera: str, exporter: IpcExporter | None = None,
           with_features: bool = False) -> BorrowedState:
    """The camera's state as it is now (never waits for frames in flight). With ``exporter`` the arrays go to its
    CUDA IPC buffers (the guest reads them over peer access), else they are inside the DYCS bytes. Reference
    feature maps only ``with_features`` (the guest pipeline runs crops mode: it has no use for them yet)."""
    from daemon.features.state import StateError, to_bytes

    try:
        if with_features:
            state = runtime.export_camera_state(camera, 0.0)
        else:  # no feature-map copy (and its stream wait) under the home tracker's lock, only to be thrown away
            state = runtime.delta.export_state(camera, time.monotonic(), 0.0, runtime.model_sha256(), ())
    except StateError:
        return BorrowedState(camera, b"")
    state = lendable(state)
    if exporter is None or state.signature is None:
        return BorrowedState(camera, to_bytes(state))
    arrays = [("signature", state.signature), *((f"features.{i}", f) for i, f in enumerate(state.features))]
    shared = exporter.export(camera, arrays)
    return BorrowedState(camera, to_bytes(dataclasses.replace(state, signature=None, features=())), shared)


def borrow_host_arrays(state: CameraState) -> BorrowedState:
    """``borrow``'s split form over the bytes route (what a guest without peer access is sent; tests)."""
    from daemon.features.state import to_bytes

    state = lendable(state)
    if state.signature is None:
        return BorrowedState(state.camera, to_bytes(state))
    arrays = [("signature", state.signature), *((f"features.{i}", f) for i, f in enumerate(state.features))]
    return BorrowedState(state.camera, to_bytes(dataclasses.replace(state, signature=None, features=())),
                         export_host(arrays))


def materialize(borrowed: BorrowedState, now: float, device: int | None = None,
                open_handle: IpcOpen = open_ipc) -> CameraState | None:
    """The CameraState of a loan (None: delta off). Arrays travelling apart are checked (``check_lent_arrays``)
    and read here: over peer access on ``device`` for IPC handles. Raises StateError where the loan is malformed
    or its signature cannot be copied to the host, daemon.gpu.ipc.PeerAccessError where the handle cannot be
    opened, SharedReadError where it opened but the read failed."""
    from daemon.features.state import from_bytes

    if not borrowed.data:
        return None
    state = from_bytes(borrowed.data, now)
    if borrowed.arrays is None:
        return state
    check_lent_arrays(state, borrowed.arrays)  # before a handle is opened for arrays the guest would refuse
    arrays = read_shared(borrowed.arrays, device, open_handle)
    named = {s.name: a for s, a in zip(borrowed.arrays.specs, arrays, strict=True)}
    feats = tuple(named[f"features.{i}"] for i in range(len(named) - 1))  # checked: the signature and these
    return dataclasses.replace(state, signature=signature_on_host(named["signature"]), features=feats)


@dataclass(frozen=True, slots=True)
class GuestOutcome:
    """What a guest batch gave: results and errors (frame seqs of the home), the cameras that started warm (their
    borrowed state was installed), frames not finished within the timeout, and the time taken."""

    results: tuple[FrameResult, ...]
    errors: tuple[FrameError, ...]
    warm: tuple[str, ...]
    unfinished: int
    seconds: float
    refused: tuple[str, ...] = ()  # cameras whose arrays could not be read over peer access (they ran cold)
    keyframes: int = 0  # frames of warm cameras planned FULL for want of a reference (the state was not usable)
    unusable: tuple[str, ...] = ()  # cameras whose borrowed state was refused (another model, malformed): cold
    read_failed: tuple[str, ...] = ()  # of ``refused``: their IPC handle opened but the read failed (SharedReadError)


CAUSES_LOGGED = 64  # distinct causes of loans not used (kind, error) logged at WARNING once each; more: DEBUG
LOAN_FAILURES = {  # GuestProcessor._log_cause's messages: camera, error, a note on further ones
    "unusable": "guest: camera %s's borrowed state is not usable (%s); its frames run cold%s",
    "read_failed": "guest: camera %s's reference arrays could not be read after their IPC handle opened (%s); its "
                   "frames run cold, the home is told (refused)%s",
    "peer_access": "guest: camera %s's reference arrays cannot be read over peer access (%s); its frames run cold, "
                   "the home is told (refused)%s",
}
GUEST_STALE_S = 5.0  # a guest pipeline whose heartbeat is older is stuck: its batches fail at once
COLD_REASONS = ("no reference",)  # FULL verdicts that mean no usable state was installed (policy.decide); a keyframe
# due by the borrowed counters is the home's schedule, not a cold start


@dataclass(slots=True)
class _Starts:
    """How a batch's cameras start: warm (their borrowed state installed, with a reference) or cold, and why cold:
    ``refused`` (the arrays could not be read over peer access; of these ``read_failed``: the handle opened but
    the read failed) or ``unusable`` (the loan was refused: another model, malformed)."""

    warm: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    read_failed: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)


class _GuestTracker(DeltaTracker):
    """The guest's tracker, counting per camera the FULL verdicts that a usable borrowed state would have avoided
    (no reference), apart from FULL frames the content or the keyframe schedule asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.cold_full: dict[str, int] = {}

    def plan(self, camera: str, signature: NDArray[np.uint8], lb: Letterbox, now: float,
             scores: tuple[NDArray[np.float32], float] | None = None) -> Verdict:
        verdict = super().plan(camera, signature, lb, now, scores)
        if verdict.decision is Decision.FULL and verdict.reason.startswith(COLD_REASONS):
            self.cold_full[camera] = self.cold_full.get(camera, 0) + 1
        return verdict


class _Collector:
    """The guest runner's sink: results of the current batch, keyed by (camera, frame seq)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.wanted: set[tuple[str, int]] = set()
        self.results: dict[tuple[str, int], FrameResult] = {}
        self.errors: dict[tuple[str, int], FrameError] = {}

    def on_result(self, result: FrameResult, image: NDArray[np.uint8] | None) -> None:
        with self.cond:
            key = (result.camera, result.seq)
            if key in self.wanted:
                self.results[key] = result
                self.cond.notify_all()

    def on_error(self, error: FrameError, bytes_in: int) -> None:
        with self.cond:
            key = (error.camera, error.seq)
            if key in self.wanted:
                self.errors[key] = error
                self.cond.notify_all()

    def on_end(self, eos: EndOfStream) -> None:
        return None

    def done(self) -> int:
        return len(self.results) + len(self.errors)


class GuestProcessor:
    """A pipeline of its own (the daemon's staged runner, its own queues and delta tracker) for guest batches, one
    batch at a time. ``choice``: the engine (a CPU engine may be shared with the host runtime: onnxruntime's CPU
    sessions run concurrently; a GPU engine may not, give the guest its own)."""

    def __init__(self, cfg: Config, choice: EngineChoice, open_handle: IpcOpen = open_ipc) -> None:
        self._cfg = cfg
        self._choice = choice
        self._open_handle = open_handle  # opens lent IPC handles (daemon.gpu.ipc.open_ipc)
        self._causes_logged: set[tuple[str, str]] = set()  # loan failures logged at WARNING (under self._lock)
        self._queues = FrameQueues()
        self._settings = SettingsBoard()
        self._delta = _GuestTracker()
        self._sink = _Collector()
        self._heartbeat = Heartbeat()
        self._lock = threading.Lock()
        self._preparer: Any = None
        self._runner: PipelineRunner | None = None
        self.batches = 0

    @property
    def device(self) -> int | None:
        """The CUDA device the guest reads peer arrays onto (None: CPU path)."""
        return self._cfg.model.gpu_device if self._choice.gpu_decoder is not None else None

    def start(self) -> None:
        from daemon.pipeline.prepare import CpuPreparer
        from daemon.pipeline.runner import PipelineRunner, RunnerOptions

        cfg, choice = self._cfg, self._choice
        if choice.gpu_decoder is not None:
            from daemon.gpu.prepare import GpuPreparer

            self._preparer = GpuPreparer(choice.gpu_decoder, cfg.limits.max_pixels, cfg.limits.max_jpeg_bytes,
                                         self._delta, device_id=cfg.model.gpu_device)
        else:
            h, _w = choice.engine.model.input_hw
            self._preparer = CpuPreparer(h, cfg.limits.max_pixels, cfg.limits.max_jpeg_bytes, delta=self._delta)
        self._runner = PipelineRunner(
            self._queues, self._preparer, choice.engine, self._settings, self._sink, self._heartbeat,
            RunnerOptions(cfg.batching.max_batch, 0.0, buffers=2, allocate=choice.allocate,
                          batch_decoder=choice.batch_decoder, d2h_bytes_per_box=choice.d2h_bytes_per_box,
                          sync=choice.sync, pad_to_batch=choice.pad_to_batch),
            delta=self._delta,
        )
        self._runner.start()

    def stop(self, timeout: float = 5.0) -> bool:
        runner, self._runner = self._runner, None
        if runner is None:
            return True
        stopped = runner.stop(timeout)
        close = getattr(self._preparer, "close", None)
        if close is not None and stopped:
            close()
        return stopped

    def process(self, frames: Sequence[Frame], cameras: Sequence[CameraConfig], states: Sequence[BorrowedState],
                timeout_s: float = 10.0) -> GuestOutcome:
        """Run ``frames`` (of ``cameras``) against the borrowed ``states``; results in the order of ``frames``. A
        loan that cannot be used (refused, unreadable, malformed) leaves its camera cold, never the batch."""
        if self._runner is None:
            raise RuntimeError("guest processor not started")
        if (age := self._heartbeat.age()) > GUEST_STALE_S:  # a dead or stuck stage: fail now, not at the timeout
            raise RuntimeError(f"the guest pipeline is stuck (heartbeat {age:.1f} s old)")
        t0 = time.perf_counter()
        with self._lock:
            self._delta.cold_full = {}
            with self._sink.cond:
                self._sink.wanted = {(f.camera, f.seq) for f in frames}
                self._sink.results, self._sink.errors = {}, {}
            try:
                starts = self._add_cameras(frames, cameras, {s.camera: s for s in states})
                ids = {c.id for c in cameras}
                for f in frames:
                    if f.camera in ids:
                        self._queues.put(f)
                results, errors = self._collect(frames, timeout_s)
            finally:
                self._remove_cameras([c.id for c in cameras])
            self.batches += 1
        unfinished = len(frames) - len(results) - len(errors)
        keyframes = sum(self._delta.cold_full.get(c, 0) for c in starts.warm)
        return GuestOutcome(tuple(results), errors, tuple(starts.warm), unfinished, time.perf_counter() - t0,
                            tuple(starts.refused), keyframes, tuple(starts.unusable), tuple(starts.read_failed))

    def _add_cameras(self, frames: Sequence[Frame], cameras: Sequence[CameraConfig],
                     lent: dict[str, BorrowedState]) -> _Starts:
        """Set the batch's cameras up in the pipeline (settings, delta parameters, a queue for their frames) and
        install their loans; how each one starts."""
        from daemon.app import camera_settings

        names = self._choice.engine.model.class_names
        starts = _Starts()
        for cam in cameras:
            self._settings.set(camera_settings(cam, names))
            self._delta.configure(cam.id, params_from_config(cam.delta or self._cfg.delta))
            self._queues.add_camera(cam.id, sum(1 for f in frames if f.camera == cam.id) + 1)
            loan = lent.get(cam.id)
            if loan is not None:
                self._install(cam.id, loan, starts)
        return starts

    def _install(self, camera: str, loan: BorrowedState, starts: _Starts) -> None:
        """Install a camera's loan in the guest's tracker: warm where it holds a reference; where it cannot be used
        the camera runs cold, noted in ``starts`` (refused, read_failed, unusable) and logged once per cause."""
        from daemon.features.state import StateError

        try:
            state = materialize(loan, time.monotonic(), self.device, self._open_handle)
            mine = self._choice.engine.model.sha256
            if state is not None and state.model_sha256 and mine and state.model_sha256 != mine:
                raise StateError(f"made by model {state.model_sha256[:12]}, the guest runs {mine[:12]}")
            if state is not None:
                self._delta.import_state(camera, state, time.monotonic())
                if state.signature is not None:  # lent before the home had a reference: cold
                    starts.warm.append(camera)
        except StateError as exc:
            self._log_cause("unusable", camera, exc)
            starts.unusable.append(camera)
        except SharedReadError as exc:  # before PeerAccessError, its base
            self._log_cause("read_failed", camera, exc)
            starts.refused.append(camera)
            starts.read_failed.append(camera)
        except PeerAccessError as exc:
            self._log_cause("peer_access", camera, exc)
            starts.refused.append(camera)

    def _collect(self, frames: Sequence[Frame], timeout_s: float) -> tuple[list[FrameResult], tuple[FrameError, ...]]:
        """Wait (at most ``timeout_s``) for the frames' results and errors; results in the order of ``frames``."""
        deadline = time.monotonic() + timeout_s
        with self._sink.cond:
            while self._sink.done() < len(self._sink.wanted):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._sink.cond.wait(left)
            results = [self._sink.results[k] for f in frames if (k := (f.camera, f.seq)) in self._sink.results]
            errors = tuple(self._sink.errors.values())
            self._sink.wanted = set()
        return results, errors

    def _remove_cameras(self, ids: Sequence[str]) -> None:
        """Take the batch's cameras out of the pipeline again (the guest keeps nothing of them)."""
        for cid in ids:
            self._queues.remove_camera(cid)
            self._settings.remove(cid)
            self._delta.configure(cid, None)
            forget = getattr(self._preparer, "forget", None)
            if forget is not None:
                forget(cid)

    def _log_cause(self, kind: str, camera: str, exc: Exception) -> None:
        """Log why a camera's loan could not be used (``kind``: a key of ``LOAN_FAILURES``): at WARNING the first
        time its cause (kind and root error) is seen, then at DEBUG, so that a home lending the same loans batch
        after batch does not flood the log (the caller counts every one). Messages name the exporter and the
        cause, never a handle (it maps the home's memory) or the arrays."""
        root = exc.__cause__ if isinstance(exc, SharedReadError) and exc.__cause__ is not None else exc
        cause = (kind, f"{type(root).__name__}: {root}"[:200])
        first = cause not in self._causes_logged and len(self._causes_logged) < CAUSES_LOGGED
        if first:
            self._causes_logged.add(cause)
        log.log(logging.WARNING if first else logging.DEBUG, LOAN_FAILURES[kind], camera, exc,
                "; further failures of this cause are logged at DEBUG" if first else "")


__all__ = ["BorrowedState", "GuestOutcome", "GuestProcessor", "borrow", "borrow_host_arrays", "lendable",
           "materialize", "route_of"]
