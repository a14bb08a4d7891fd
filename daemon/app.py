"""Composition root: builds the runtime from a config, starts it in order, stops it in reverse."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from daemon.backend import EngineChoice, build_engine
from daemon.cameras import build_source
from daemon.config.model import CameraConfig, Config, FileSource, ReplaySource
from daemon.delta.tracker import DeltaTracker, params_from_config
from daemon.framequeue import FrameQueues, Item

if TYPE_CHECKING:
    from daemon.features.cache import FeatureCache
    from daemon.features.live import FeatureStage
    from daemon.features.state import CameraState
    from daemon.gpu.prepare import GpuPreparer
from daemon.pipeline.heartbeat import Heartbeat
from daemon.pipeline.prepare import CpuPreparer
from daemon.pipeline.runner import PipelineRunner, RunnerOptions
from daemon.pipeline.settings import CameraSettings, SettingsBoard, resolve_class_ids
from daemon.publish import Publisher
from daemon.sources.base import Source
from daemon.stats.collector import SourceCounters, StatsCollector
from daemon.stats.model import NodeStats
from daemon.types import EndOfStream, FrameError, FrameResult

log = logging.getLogger(__name__)
GPU_GIL_SWITCH_S = 0.001  # Python's GIL switch interval on the GPU path (see Runtime.start)


class FrameObserver(Protocol):
    """Something that wants to see results with their decoded image (previews)."""

    def offer(self, camera: str, image: NDArray[np.uint8], result: FrameResult) -> object: ...


@dataclass(frozen=True, slots=True)
class CameraHealth:
    camera: str
    alive: bool
    state: str
    last_frame_age_s: float | None


@dataclass(frozen=True, slots=True)
class RuntimeHealth:
    ok: bool
    heartbeat_age_s: float
    cameras: tuple[CameraHealth, ...]


@dataclass(frozen=True, slots=True)
class ReloadReport:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    restarted: tuple[str, ...]
    updated: tuple[str, ...]
    needs_restart: tuple[str, ...]  # config sections whose change needs a daemon restart (kept as running)


class _Fanout:
    """The pipeline's sink: stats first, then every publisher; one failing publisher never stops the others."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def on_result(self, result: FrameResult, image: NDArray[np.uint8] | None) -> None:
        now = time.monotonic()
        self._rt.stats.record_result(result, now, result.bytes_h2d, result.bytes_d2h)
        for pub in self._rt.publishers:
            _guarded(pub.publish_result, result)
        if image is not None:
            for obs in self._rt.observers:
                _guarded(obs.offer, result.camera, image, result)

    def on_error(self, error: FrameError, bytes_in: int) -> None:
        self._rt.stats.record_error(error, bytes_in)
        self._rt.error_log(error)
        for pub in self._rt.publishers:
            _guarded(pub.publish_error, error)

    def on_end(self, eos: EndOfStream) -> None:
        """After the camera's last frame: its final state ("failed" for a source that could never work, else
        "ended"), published once, so the retained MQTT state is the true last one."""
        log.info("camera %s: stream ended (%s)", eos.camera, eos.reason)
        state = "failed" if eos.reason.startswith("failed") else "ended"
        if self._rt.mark_state(eos.camera, state):
            for pub in self._rt.publishers:
                _guarded(pub.publish_camera_state, eos.camera, state, eos.reason)
        self._rt.note_end(eos.camera)


def _guarded(fn: Callable[..., object], *args: object) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("publisher %r failed", getattr(fn, "__qualname__", fn))


class Runtime:
    """One node: sources -> queues -> pipeline -> publishers, plus the stats thread."""

    def __init__(
        self,
        cfg: Config,
        publishers: Sequence[Publisher] = (),
        observers: Sequence[FrameObserver] = (),
        on_stats: Callable[[NodeStats], None] | None = None,
        engine: EngineChoice | None = None,
        source_factory: Callable[[CameraConfig, Callable[[Item], object]], Source] | None = None,
    ) -> None:
        self.cfg = cfg
        self.publishers = list(publishers)
        self.observers = list(observers)
        self._on_stats = on_stats
        self._choice = engine
        self._owns_engine = engine is None
        self._source_factory = source_factory or _default_source
        self.queues = FrameQueues()
        self.settings = SettingsBoard()
        self.heartbeat = Heartbeat()
        self.delta = DeltaTracker()
        self.feature_cache: FeatureCache | None = None  # reference feature maps, where delta.mode keeps them
        self._features: FeatureStage | None = None  # delta.mode features
        self.sources: dict[str, Source] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        self._latest: NodeStats | None = None
        self._runner: PipelineRunner | None = None
        self._preparer: object = None
        self._error_counts: dict[tuple[str, str], int] = {}
        self._states: dict[str, str] = {}
        self._held_states: set[str] = set()
        self.stats = StatsCollector("unstarted", "")

    # -- start / stop ---------------------------------------------------------------------------------------
    def _feature_stage(self, cfg: Config, choice: EngineChoice) -> FeatureStage | None:
        """The feature stage, when a camera runs delta.mode features (see :func:`feature_stage_for`)."""
        from daemon.features.cache import FeatureCache

        cache = self.feature_cache if self.feature_cache is not None else FeatureCache()
        stage = feature_stage_for(cfg, choice, cache)
        if stage is None:
            return None
        self.feature_cache = cache
        self.stats.set_feature_probe(stage.stream_bytes)
        return stage

    @property
    def engine_choice(self) -> EngineChoice | None:
        """The engine the runtime runs (None before start): a guest pipeline (daemon.guest) may share it."""
        return self._choice

    @property
    def feature_stage(self) -> FeatureStage | None:
        """The running feature stage (None without delta.mode features cameras, or where it could not be built)."""
        return self._features

    def start(self) -> None:
        cfg = self.cfg
        if self._choice is None:
            self._choice = build_engine(cfg.model, cfg.batching.max_batch)
        choice = self._choice
        log.info("backend %s: %s", choice.backend, choice.reason)
        log.info("video decode: %s", choice.gpu_video_reason)
        if self._source_factory is _default_source and choice.gpu_video:
            self._source_factory = _gpu_video_source  # H.264/H.265 packets go to NVDEC instead of being decoded here
        self.stats = StatsCollector(choice.backend, choice.reason)
        self.stats.set_delta_probe(lambda c: (s.reference_bytes if (s := self.delta.snapshot(c)) is not None else None))
        h, _w = choice.engine.model.input_hw
        preparer: CpuPreparer | GpuPreparer
        self._features = self._feature_stage(cfg, choice)
        if choice.gpu_decoder is not None:
            from daemon.gpu.prepare import GpuPreparer

            stage = self._features
            preparer = GpuPreparer(choice.gpu_decoder, cfg.limits.max_pixels, cfg.limits.max_jpeg_bytes, self.delta,
                                   device_id=cfg.model.gpu_device, features=None if stage is None else stage.wants)
        else:
            stage = self._features
            preparer = CpuPreparer(h, cfg.limits.max_pixels, cfg.limits.max_jpeg_bytes, delta=self.delta,
                                   features=None if stage is None else stage.wants)
        for cam in cfg.cameras:
            if cam.enabled:
                self._register(cam)
        self._preparer = preparer
        if choice.gpu_decoder is not None and sys.getswitchinterval() > GPU_GIL_SWITCH_S:
            # the GPU path's stage threads let go of the GIL around every device call and want it back at once;
            # at Python's default 5 ms a waiting stage idles (H200, 16 cameras: 1 ms gave 10-25 % more frames/s)
            log.info("GIL switch interval %.1f ms -> %.1f ms (GPU path)", sys.getswitchinterval() * 1000,
                     GPU_GIL_SWITCH_S * 1000)
            sys.setswitchinterval(GPU_GIL_SWITCH_S)
        self._runner = PipelineRunner(
            self.queues, preparer, choice.engine, self.settings, _Fanout(self), self.heartbeat,
            RunnerOptions(cfg.batching.max_batch, cfg.batching.max_wait_ms / 1000.0,
                          buffers=4 if choice.gpu_decoder is not None else 3, allocate=choice.allocate,
                          batch_decoder=choice.batch_decoder, d2h_bytes_per_box=choice.d2h_bytes_per_box,
                          sync=choice.sync, pad_to_batch=choice.pad_to_batch, features=self._features),
            delta=self.delta,
        )
        self._runner.start()
        for cam_id in list(self.sources):
            self._start_source(cam_id)
        self._stats_thread = threading.Thread(target=self._stats_loop, name="stats", daemon=True)
        self._stats_thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Reverse of start: sources, then the pipeline drains, then a last stats record, then publishers."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self.queues.release_waiters()
        clean = True
        for cam_id in list(self.sources):
            clean &= self.sources[cam_id].stop(max(0.1, min(2.0, deadline - time.monotonic())))
        if self._runner is not None:
            stopped = self._runner.stop(max(0.1, deadline - time.monotonic()))
            clean &= stopped
            close = getattr(self._preparer, "close", None)
            if close is not None and stopped:  # a stage still running may use them: then the collector frees them
                close()  # device buffers and pinned staging, freed in order rather than by the garbage collector
        if self._stats_thread is not None:
            self._stats_thread.join(max(0.1, deadline - time.monotonic()))
        self._emit_stats()
        for pub in self.publishers:
            try:
                pub.close(max(0.1, deadline - time.monotonic()))
            except Exception:
                clean = False
                log.exception("closing publisher failed")
        if self._choice is not None and self._owns_engine:
            self._choice.engine.close()
        return clean

    # -- cameras --------------------------------------------------------------------------------------------
    def _register(self, cam: CameraConfig) -> None:
        names = self._choice.engine.model.class_names if self._choice else ()
        self.settings.set(camera_settings(cam, names))
        self.delta.configure(cam.id, params_from_config(cam.delta or self.cfg.delta))
        self.queues.add_camera(cam.id, cam.queue_size)
        self.stats.add_camera(cam.id)
        self.sources[cam.id] = self._source_factory(cam, self._sink_for(cam))

    def _sink_for(self, cam: CameraConfig) -> Callable[[Item], object]:
        """Live cameras drop the oldest frame when the pipeline falls behind; as-fast-as-possible replays wait."""
        src = cam.source
        if isinstance(src, ReplaySource | FileSource) and not src.realtime:
            return self.queues.put_wait
        return self.queues.put

    def _start_source(self, cam_id: str) -> None:
        self.sources[cam_id].start()

    def add_camera(self, cam: CameraConfig) -> None:
        with self._lock:
            self._ended.discard(cam.id)
            self._states.pop(cam.id, None)
            self._register(cam)
            self._start_source(cam.id)

    def remove_camera(self, cam_id: str, timeout: float = 5.0) -> None:
        with self._lock:
            src = self.sources.pop(cam_id, None)
            self._held_states.discard(cam_id)
        self.queues.remove_camera(cam_id)  # first: a replay waiting for room gives up at once
        if src is not None:
            src.stop(timeout)
        self.settings.remove(cam_id)
        self.delta.configure(cam_id, None)
        forget = getattr(self._preparer, "forget", None)
        if forget is not None:
            forget(cam_id)  # GPU path: the camera's device reference slot
        self.stats.remove_camera(cam_id)
        for pub in self.publishers:
            _guarded(pub.publish_camera_state, cam_id, "removed", "")

    def apply_config(self, new: Config) -> ReloadReport:
        """Hot reload: cameras added, removed or changed without disturbing the others.

        Camera settings that need no new source (thresholds, ROI, mask, delta) change in place; a changed source,
        queue or fps cap restarts only that camera. Sections that need a restart (node, model, batching, outputs)
        are reported and keep their running values.
        """
        old_cams = {c.id: c for c in self.cfg.cameras if c.enabled}
        new_cams = {c.id: c for c in new.cameras if c.enabled}
        needs_restart = tuple(
            name for name in ("node", "model", "batching", "outputs", "limits")
            if getattr(self.cfg, name) != getattr(new, name)
        )
        removed = sorted(set(old_cams) - set(new_cams))
        added = sorted(set(new_cams) - set(old_cams))
        restarted, updated = [], []
        for cam_id in sorted(set(old_cams) & set(new_cams)):
            a, b = old_cams[cam_id], new_cams[cam_id]
            if a == b:
                continue
            if (a.source, a.queue_size, a.fps_cap) != (b.source, b.queue_size, b.fps_cap):
                restarted.append(cam_id)
            else:
                updated.append(cam_id)
        names = self._choice.engine.model.class_names if self._choice else ()
        staged = {cid: camera_settings(new_cams[cid], names) for cid in [*added, *restarted, *updated]}
        for cam_id in removed + restarted:
            self.remove_camera(cam_id)
        for cam_id in updated:
            self.settings.set(staged[cam_id])
            self.delta.configure(cam_id, params_from_config(new_cams[cam_id].delta or new.delta))
        for cam_id in restarted + added:
            self.add_camera(new_cams[cam_id])
        kept = {name: getattr(self.cfg, name) for name in needs_restart}
        self.cfg = new.model_copy(update={**kept, "stats": new.stats, "delta": new.delta})
        wanted = features_cameras(self.cfg)
        if self._features is not None:
            self._features.set_cameras(wanted, features_cameras(self.cfg, streams=True))
        elif wanted:
            log.warning("delta.mode features for %s needs a restart (the feature stage is built at start); "
                        "they run in crops mode until then", ", ".join(wanted))
        report = ReloadReport(tuple(added), tuple(removed), tuple(restarted), tuple(updated), needs_restart)
        log.info("config reloaded: %s", report)
        return report

    def note_end(self, camera: str) -> None:
        with self._lock:
            self._ended.add(camera)

    def all_ended(self) -> bool:
        """True when every finite source has ended (and its frames were processed) or failed for good."""
        with self._lock:
            sources = dict(self.sources)
            ended = set(self._ended)
        return bool(sources) and all(c in ended or s.stats().state == "failed" for c, s in sources.items())

    def error_log(self, error: FrameError) -> None:
        key = (error.camera, error.kind)
        n = self._error_counts.get(key, 0) + 1
        self._error_counts[key] = n
        if n == 1 or n & (n - 1) == 0:  # 1, 2, 4, 8, ... : a broken camera cannot flood the journal
            log.warning("camera %s: frame %d rejected (%s): %s [%d so far]",
                        error.camera, error.seq, error.kind, error.message, n)

    # -- stats and health -----------------------------------------------------------------------------------
    def _stats_loop(self) -> None:
        next_stats = time.monotonic() + self.cfg.stats.interval_s
        while not self._stop.wait(0.25):
            if time.monotonic() >= next_stats:
                next_stats += self.cfg.stats.interval_s
                self._emit_stats()
            else:
                self._publish_state_changes()

    def hold_states(self, cameras: Sequence[str]) -> None:
        """These cameras are being handed over (cluster moves): their readers stop, but the camera does not end;
        no state is published for them until they are removed."""
        with self._lock:
            self._held_states.update(cameras)

    def mark_state(self, camera: str, state: str) -> bool:
        """Record ``state`` as the camera's published state; False when it already was (publish nothing)."""
        with self._lock:
            if self._states.get(camera) == state:
                return False
            self._states[camera] = state
            return True

    def _publish_state_changes(self) -> None:
        with self._lock:
            sources = dict(self.sources)
        with self._lock:
            held = set(self._held_states)
        for cam_id, src in sources.items():
            if cam_id in held:
                continue
            s = src.stats()
            if s.state == "ended" and self._states.get(cam_id) == "failed":
                continue  # the end of a failed source is its failure
            if self.mark_state(cam_id, s.state):
                if s.state == "failed":
                    log.error("camera %s failed: %s", cam_id, s.last_error)
                for pub in self.publishers:
                    _guarded(pub.publish_camera_state, cam_id, s.state, s.last_error)

    def _emit_stats(self) -> None:
        self._publish_state_changes()
        try:
            snap = self.stats.snapshot(self._source_counters(), self.cfg.stats.liveness_s)
        except Exception:
            log.exception("stats snapshot failed")
            return
        if self._runner is not None and self._runner.dropped_boxes:
            snap = replace(snap, corrupt_boxes=self._runner.dropped_boxes)
        self._latest = snap
        for pub in self.publishers:
            _guarded(pub.publish_stats, snap)
        if self._on_stats is not None:
            _guarded(self._on_stats, snap)

    def _source_counters(self) -> list[SourceCounters]:
        out = []
        with self._lock:
            sources = dict(self.sources)
        for cam_id, src in sources.items():
            s = src.stats()
            q = self.queues.counters(cam_id)
            out.append(SourceCounters(cam_id, s.received, q.dropped, s.skipped_fps, s.reconnects, s.last_frame_mono))
        return out

    def latest_stats(self) -> NodeStats | None:
        return self._latest

    def heartbeat_age(self) -> float:
        return self.heartbeat.age()

    def health(self) -> RuntimeHealth:
        max_heartbeat_age_s = self.cfg.http.heartbeat_max_age_s
        now = time.monotonic()
        cams = []
        with self._lock:
            sources = dict(self.sources)
        for cam_id, src in sorted(sources.items()):
            s = src.stats()
            age = None if s.last_frame_mono is None else now - s.last_frame_mono
            alive = age is not None and age <= self.cfg.stats.liveness_s
            cams.append(CameraHealth(cam_id, alive, s.state, age))
        hb = self.heartbeat.age()
        return RuntimeHealth(hb <= max_heartbeat_age_s, hb, tuple(cams))

    # -- camera state moves (daemon.features.state format) --------------------------------------------------
    def model_sha256(self) -> str:
        return self._choice.engine.model.sha256 if self._choice is not None else ""

    def export_camera_state(self, camera: str, wait_s: float = 1.0) -> CameraState:
        """The camera's reference state (signature, policy counters, cached detections, feature maps where kept);
        waits up to ``wait_s`` for a frame of the camera in flight. Raises StateError when delta is off."""

        def feats() -> tuple[Any, ...]:  # read once no frame of the camera is in flight, copied (device maps: and
            maps = self.feature_cache.copy(camera) if self.feature_cache is not None else None  # waited for)
            return tuple(maps or ())

        return self.delta.export_state(camera, time.monotonic(), wait_s, self.model_sha256(), feats)

    def settled_camera_state(self, camera: str) -> CameraState | None:
        """The camera's state as of its last frame resolved after every earlier one, without waiting for frames in
        flight (checkpoints: DeltaTracker.settled_state). None when there is none yet, or when the camera keeps
        feature maps (they have no settled copy: use ``export_camera_state``). Raises StateError when delta is
        off."""
        if self.feature_cache is not None and self.feature_cache.get(camera) is not None:
            return None
        return self.delta.settled_state(camera, time.monotonic(), self.model_sha256())

    def import_camera_state(self, camera: str, state: CameraState) -> None:
        """Install a state exported by another runtime (clock values rebased to ours). Raises StateError and
        changes nothing when it was made by another model or is not sound; the camera then starts cold."""
        from daemon.features.state import StateError

        mine = self.model_sha256()
        if state.model_sha256 and mine and state.model_sha256 != mine:
            raise StateError(f"camera {camera!r}: state was made by model {state.model_sha256[:12]}, this runtime "
                             f"runs {mine[:12]}")
        self.delta.import_state(camera, state, time.monotonic())
        if self.feature_cache is not None:
            if state.features:
                self.feature_cache.put(camera, list(state.features))
            else:
                self.feature_cache.drop(camera)

    def export_camera(self, camera: str, wait_s: float = 1.0) -> bytes:
        """``export_camera_state`` as bytes, for another process, GPU or host."""
        from daemon.features.state import to_bytes

        return to_bytes(self.export_camera_state(camera, wait_s))

    def import_camera(self, camera: str, data: bytes) -> None:
        """The inverse of ``export_camera`` (raises StateError on bytes that cannot be used here)."""
        from daemon.features.state import from_bytes

        self.import_camera_state(camera, from_bytes(data, time.monotonic()))


def _gpu_video_source(cam: CameraConfig, sink: Callable[[Item], object]) -> Source:
    return build_source(cam, sink, gpu_video=True)


def _default_source(cam: CameraConfig, sink: Callable[[Item], object]) -> Source:
    return build_source(cam, sink)


def features_cameras(cfg: Config, streams: bool = False) -> list[str]:
    """The enabled cameras whose delta caching is on in ``features`` mode (``streams``: and feature_stream)."""
    out = []
    for cam in cfg.cameras:
        d = cam.delta or cfg.delta
        if cam.enabled and d.enabled and d.mode == "features" and (d.feature_stream or not streams):
            out.append(cam.id)
    return out


def feature_stage_for(cfg: Config, choice: EngineChoice, cache: FeatureCache) -> FeatureStage | None:
    """The feature stage for ``cfg``'s delta.mode features cameras (None without any): on the CPU path host maps,
    on the GPU path device maps (daemon.features.gpu). Where the GPU stage cannot be built, such cameras run in
    crops mode, said once in the log with the reason."""
    wanted = features_cameras(cfg)
    if not wanted:
        return None
    from daemon.features.live import FeatureStage

    if choice.gpu_decoder is not None:
        from daemon.features.gpu import build_gpu_stage

        try:
            stage = build_gpu_stage(choice.engine.model, cache, cfg.model.gpu_device,
                                    getattr(choice.sync, "infer", None), cfg.model.precision == "fp16")
        except Exception as exc:
            log.warning("delta.mode features cannot run on %s (%s: %s); %s use crops mode", choice.backend,
                        type(exc).__name__, exc, ", ".join(wanted))
            return None
    else:
        stage = FeatureStage.build(choice.engine.model, cache, cfg.model.threads)
    stage.set_cameras(wanted, features_cameras(cfg, streams=True))
    log.info("delta.mode features: %s (backbone/head split of %s, %s maps)", ", ".join(wanted),
             choice.engine.model.path.name, "device" if choice.gpu_decoder is not None else "host")
    return stage


def camera_settings(cam: CameraConfig, model_names: Sequence[str]) -> CameraSettings:
    t = cam.thresholds
    mask = tuple(np.round(np.asarray(poly, dtype=np.float64)).astype(np.int32) for poly in (cam.mask or ()))
    return CameraSettings(
        camera=cam.id, confidence=t.confidence, iou=t.iou, max_detections=t.max_detections,
        class_ids=resolve_class_ids(t.classes, model_names, cam.id), roi=cam.roi, mask=mask,
    )


__all__ = ["CameraHealth", "FrameObserver", "Runtime", "RuntimeHealth", "camera_settings"]
