"""Warm fail-over: camera-state checkpoints taken on the workers and kept off them, by the coordinator.

A worker that dies cannot export anything, so every ``coordinator.checkpoint_interval_s`` each worker exports the
state of every camera it hosts (``Runtime.export_camera_state``, DYCS v1 bytes, the same form a graceful move
carries) from a thread of its own (:class:`Checkpointer`). Only settled states are kept: the tracker keeps, per
camera, a snapshot of its state as of the last frame resolved after every earlier one (frames planned since left
out; :func:`settled_checkpoint`, DeltaTracker.settled_state), so a camera that always has a frame in flight is
checkpointed too, and the bytes are made outside the tracker's lock. Cameras that keep feature maps (features
mode) have no such snapshot; for them the export waits briefly for no frame in flight, as before, and an
unsettled one keeps the previous checkpoint.

The bytes never ride on the liveness poll: a worker's status carries only a small :class:`CheckpointInfo` per
camera (camera, version, age, size), and the coordinator fetches the changed states with a call of their own
(``checkpoints``), on a loop of its own, at most ``checkpoint_fetch_bytes`` a round (:class:`CheckpointCollector`
chooses which: cameras without a kept state first, then the stalest). A slow or failed fetch delays nothing
else and keeps the previous checkpoint. The coordinator keeps the latest per camera in a :class:`CheckpointStore`,
bounded in bytes (oldest evicted) and per state. When a worker dies, its cameras' grants carry their checkpoints
with their age; the new worker imports them aged by that much (the cached detections and the keyframe clock are
that much older), or starts the camera cold with a forced keyframe when there is none, it is older than
``checkpoint_max_age_s``, or it cannot be used (another model, malformed: the import refuses it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cluster.cache_transfer import STATE_FORMAT, CacheBlob, MoveTiming

if TYPE_CHECKING:
    from daemon.features.state import CameraState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What a worker's status says of a camera's latest checkpoint; the state itself comes with a fetch."""

    camera: str
    version: int  # the checkpointer's serial: grows with every checkpoint a replica takes (per instance)
    age_s: float  # how old the state was when the status was made
    nbytes: int


@dataclass(frozen=True, slots=True)
class CheckpointOffer:
    """A checkpoint as a worker reports it: the state, how old it was when the status was made, its serial."""

    blob: CacheBlob
    age_s: float
    serial: int


def settled_checkpoint(state_of: Callable[[str], CameraState | None], camera: str, worker: str,
                       on_timing: Callable[[MoveTiming], None] | None = None) -> CacheBlob | None:
    """A checkpoint from the camera's settled snapshot (``Runtime.settled_camera_state``: the state as of its last
    frame resolved after every earlier one, taken without waiting and copied outside the tracker's lock), so a
    camera that always has a frame in flight is checkpointed too. None: delta off, no settled state yet, or the
    camera keeps feature maps (the caller falls back to the waiting export)."""
    from daemon.features.state import StateError, to_bytes

    t = time.perf_counter()
    try:
        state = state_of(camera)
    except StateError:
        return None
    if state is None or state.signature is None or not state.policy.has_reference:
        return None
    data = to_bytes(state)
    if on_timing is not None:
        on_timing(MoveTiming(camera, "checkpoint", len(data), time.perf_counter() - t, True))
    return CacheBlob(camera, STATE_FORMAT, data, len(data), worker)


class Checkpointer:
    """Worker side: a thread that exports each hosted camera's settled state every ``interval_s``.

    ``export(camera)`` returns the camera's state or None (delta off, a frame in flight, no reference yet);
    ``cameras()`` the cameras hosted now. The latest state per camera waits for the coordinator's next poll."""

    def __init__(
        self, export: Callable[[str], CacheBlob | None], cameras: Callable[[], Sequence[str]], interval_s: float,
        name: str = "checkpoint", clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"checkpoint interval must be > 0, got {interval_s}")
        self._export = export
        self._cameras = cameras
        self._interval = interval_s
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[CacheBlob, float, int]] = {}  # camera -> (blob, taken at, serial)
        self._serial = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken = 0
        self.unsettled = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_once(self) -> int:
        """Export every hosted camera once; the number of checkpoints taken."""
        cams = list(self._cameras())
        taken = 0
        for cam in cams:
            if self._stop.is_set():
                break
            try:
                blob = self._export(cam)
            except Exception:
                log.exception("%s: checkpoint of camera %s failed", self._name, cam)
                blob = None
            if blob is None:
                self.unsettled += 1
                continue
            with self._lock:
                self._serial += 1
                self._latest[cam] = (blob, self._clock(), self._serial)
            taken += 1
        with self._lock:  # cameras no longer hosted: their checkpoints are someone else's business now
            for gone in set(self._latest) - set(cams):
                del self._latest[gone]
        self.taken += taken
        return taken

    def infos(self) -> tuple[CheckpointInfo, ...]:
        """A descriptor of every camera's latest checkpoint (what the status carries: no bytes)."""
        now = self._clock()
        with self._lock:
            return tuple(CheckpointInfo(cam, s, max(0.0, now - t), len(b.data))
                         for cam, (b, t, s) in sorted(self._latest.items()))

    def fetch(self, cameras: Sequence[str], max_bytes: int) -> tuple[CheckpointOffer, ...]:
        """The latest checkpoints of ``cameras``, in that order, as long as they fit ``max_bytes`` in all (one that
        does not fit is left out, later smaller ones still come; cameras without a checkpoint are left out)."""
        now = self._clock()
        out: list[CheckpointOffer] = []
        total = 0
        with self._lock:
            for cam in cameras:
                got = self._latest.get(cam)
                if got is None or total + len(got[0].data) > max_bytes:
                    continue
                blob, taken, serial = got
                total += len(blob.data)
                out.append(CheckpointOffer(blob, max(0.0, now - taken), serial))
        return tuple(out)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.run_once()


@dataclass(frozen=True, slots=True)
class Stored:
    blob: CacheBlob
    taken_at: float  # the coordinator's clock
    worker: str


class CheckpointStore:
    """Coordinator side: the latest checkpoint per camera, at most ``max_bytes`` in all (the oldest go first) and
    ``max_item_bytes`` each (larger ones are refused and counted). Not thread-safe (the coordinator's loop)."""

    def __init__(self, max_bytes: int, max_item_bytes: int) -> None:
        if max_item_bytes <= 0 or max_bytes < max_item_bytes:
            raise ValueError(f"need 0 < max_item_bytes <= max_bytes, got {max_item_bytes} and {max_bytes}")
        self._max_bytes = max_bytes
        self._max_item = max_item_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()  # oldest first
        self.bytes = 0
        self.refused = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def max_item_bytes(self) -> int:
        return self._max_item

    def put(self, blob: CacheBlob, taken_at: float, worker: str) -> bool:
        """Keep ``blob`` as its camera's checkpoint unless a newer one is kept; False when refused or dropped.
        Over the byte budget, the checkpoints received longest ago go first."""
        size = len(blob.data)
        if size > self._max_item:
            self.refused += 1
            return False
        old = self._items.get(blob.camera)
        if old is not None:
            if old.taken_at >= taken_at:
                return False
            self._remove(blob.camera)
        self._items[blob.camera] = Stored(blob, taken_at, worker)
        self.bytes += size
        while self.bytes > self._max_bytes:
            self._remove(next(iter(self._items)))
            self.evicted += 1
        return True

    def get(self, camera: str, now: float, max_age_s: float) -> CacheBlob | None:
        """The camera's checkpoint with its age set, or None when there is none or it is older than ``max_age_s``."""
        s = self._items.get(camera)
        if s is None:
            return None
        age = max(0.0, now - s.taken_at)
        if age > max_age_s:
            return None
        return replace(s.blob, age_s=age)

    def age(self, camera: str, now: float) -> float | None:
        s = self._items.get(camera)
        return None if s is None else max(0.0, now - s.taken_at)

    def _remove(self, camera: str) -> None:
        s = self._items.pop(camera)
        self.bytes -= len(s.blob.data)


@dataclass(frozen=True, slots=True)
class Pending:
    """A checkpoint a worker described that the coordinator has not fetched yet."""

    worker: str
    instance: str
    info: CheckpointInfo


def fetch_plan(pending: Sequence[Pending], kept_age: Mapping[str, float],
               budget: int) -> dict[tuple[str, str], list[CheckpointInfo]]:
    """Which checkpoints to fetch this round: (worker, instance) -> descriptors, at most ``budget`` bytes in all.

    Cameras with no kept checkpoint come first, then those whose kept one (``kept_age``: camera -> age) is the
    oldest; each is taken when it still fits the budget (one that does not waits for a later round, where it
    ranks higher once the others are fresh). Ties by camera. Pure."""
    order = sorted(pending, key=lambda p: (-kept_age.get(p.info.camera, float("inf")), p.info.camera, p.worker))
    out: dict[tuple[str, str], list[CheckpointInfo]] = {}
    total = 0
    for p in order:
        if total + p.info.nbytes > budget:
            continue
        total += p.info.nbytes
        out.setdefault((p.worker, p.instance), []).append(p.info)
    return out


class CheckpointCollector:
    """Coordinator side: the descriptors the status polls brought, the versions fetched, and the store.

    ``offered`` replaces a worker's descriptors with each poll (only those of cameras it owns); ``plan`` picks
    this round's fetches; ``received`` keeps what a fetch brought where the worker still owns the camera. Not
    thread-safe (the coordinator's loop)."""

    def __init__(self, store: CheckpointStore, budget: int) -> None:
        if budget < store.max_item_bytes:
            raise ValueError(f"a fetch round's budget {budget} is below the largest state kept {store.max_item_bytes}")
        self.store = store
        self._budget = budget
        self._offered: dict[str, tuple[str, tuple[CheckpointInfo, ...]]] = {}  # worker -> (instance, infos)
        self._seen: dict[str, tuple[str, int]] = {}  # camera -> (instance, version) fetched or refused last
        self._too_big: set[str] = set()  # cameras whose oversized checkpoints were logged
        self.fetched = 0
        self.fetched_bytes = 0

    def offered(self, worker: str, instance: str, infos: Iterable[CheckpointInfo]) -> None:
        mine = []
        for info in infos:
            if not self._is_new(instance, info):
                continue
            if info.nbytes > self.store.max_item_bytes:  # would be refused: never fetched, counted once
                self._seen[info.camera] = (instance, info.version)
                self.store.refused += 1
                if info.camera not in self._too_big:
                    self._too_big.add(info.camera)
                    log.warning("camera %s: checkpoint of %d bytes is above checkpoint_max_state_bytes %d: not kept "
                                "(its fail-overs start cold)", info.camera, info.nbytes, self.store.max_item_bytes)
                continue
            mine.append(info)
        self._offered[worker] = (instance, tuple(mine))

    def withdraw(self, worker: str) -> None:
        """The worker is dead or replaced: nothing more is fetched from it."""
        self._offered.pop(worker, None)

    def plan(self, now: float) -> dict[tuple[str, str], list[CheckpointInfo]]:
        """This round's fetches (``fetch_plan`` over the descriptors not fetched yet)."""
        pending = [Pending(w, inst, i) for w, (inst, infos) in sorted(self._offered.items()) for i in infos
                   if self._is_new(inst, i)]
        ages = {p.info.camera: a for p in pending if (a := self.store.age(p.info.camera, now)) is not None}
        return fetch_plan(pending, ages, self._budget)

    def received(self, worker: str, instance: str, offers: Sequence[CheckpointOffer], owns: Callable[[str], bool],
                 now: float) -> int:
        """Keep the fetched states of cameras ``worker`` still owns; the bytes kept."""
        kept = 0
        for offer in offers:
            cam = offer.blob.camera
            if not owns(cam):
                continue
            self._seen[cam] = (instance, offer.serial)
            self.fetched += 1
            self.fetched_bytes += len(offer.blob.data)
            if self.store.put(offer.blob, now - offer.age_s, worker):
                kept += len(offer.blob.data)
        return kept

    def _is_new(self, instance: str, info: CheckpointInfo) -> bool:
        seen = self._seen.get(info.camera)
        return seen is None or seen[0] != instance or seen[1] < info.version


__all__ = ["CheckpointCollector", "CheckpointInfo", "CheckpointOffer", "CheckpointStore", "Checkpointer", "Pending",
           "Stored", "fetch_plan", "settled_checkpoint"]
