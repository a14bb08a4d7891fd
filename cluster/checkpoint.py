"""Warm fail-over: camera-state checkpoints taken on the workers and kept off them, by the coordinator.

A worker that dies cannot export anything, so every ``coordinator.checkpoint_interval_s`` each worker exports the
state of every camera it hosts (``Runtime.export_camera_state``, DYCS v1 bytes, the same form a graceful move
carries) from a thread of its own (:class:`Checkpointer`). Only settled states are kept (no frame of the camera in
flight, a reference present): an unsettled export would only ever give the importer a keyframe, so the previous
checkpoint stays instead. The coordinator collects the new ones with its status polls (each poll acknowledges what
it got: ``since``) and keeps the latest per camera in a :class:`CheckpointStore`, bounded in bytes (oldest
evicted) and per state. When a worker dies, its cameras' grants carry their checkpoints with their age; the new
worker imports them aged by that much (the cached detections and the keyframe clock are that much older), or
starts the camera cold with a forced keyframe when there is none, it is older than ``checkpoint_max_age_s``, or
it cannot be used (another model, malformed: the import refuses it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from cluster.cache_transfer import CacheBlob

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckpointOffer:
    """A checkpoint as a worker reports it: the state, how old it was when the status was made, its serial."""

    blob: CacheBlob
    age_s: float
    serial: int


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

    def since(self, serial: int) -> tuple[int, tuple[CheckpointOffer, ...]]:
        """(the latest serial, the checkpoints newer than ``serial`` with their age now)."""
        now = self._clock()
        with self._lock:
            new = tuple(CheckpointOffer(b, max(0.0, now - t), s) for b, t, s in self._latest.values() if s > serial)
            return self._serial, new

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


__all__ = ["CheckpointOffer", "CheckpointStore", "Checkpointer", "Stored"]
