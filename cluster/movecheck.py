"""The camera-move check of the feature-cache issue: a camera's state exported from one Runtime and imported into
another (another GPU, or another process through bytes) gives the same next-frame results as a camera that
stayed.

Runtime A runs cameras ``stay`` and ``move`` on the same frames, one frame at a time (each batch holds one frame,
so results do not depend on batching); then ``move``'s state is exported from A and imported into runtime B
(``model.gpu_device`` of each runtime set by ``devices``); then the next frames go to A's ``stay``, to B's
``move`` and to B's ``cold`` (a camera without imported state). ``move`` must give ``stay``'s delta decisions
and detections frame by frame; ``cold`` shows what a move without state costs (a FULL first frame).

With two GPUs the state also travels as a device buffer: packed on GPU ``devices[0]`` (one blob: signature and
feature maps), copied to ``devices[1]`` peer to peer and, for comparison, staged through host memory; the imported
state is the one that came over the peer route. Reference feature maps (yolov8n's backbone taps, FP16, what
``delta.mode: features`` keeps per camera) are attached with ``--features`` so the moved buffer has its real size.

usage: python3 -m cluster.movecheck [--devices 0 1] [--frames 24] [--split 12] [--features] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.app import Runtime
from daemon.config.model import CameraConfig, Config
from daemon.framequeue import Item
from daemon.publish import NullPublisher
from daemon.sources.base import Source
from daemon.types import Detection, FrameError, FrameResult

log = logging.getLogger(__name__)


class ManualSource(Source):
    """A camera the caller feeds one JPEG at a time (``push``); its reader thread only waits for ``stop``."""

    def _run(self) -> None:
        while self._wait(0.05):
            pass

    def push(self, jpeg: bytes) -> None:
        mono = self._admit()
        if mono is not None:
            self._add_bytes(len(jpeg))
            self._push_jpeg(jpeg, mono)


class Collector(NullPublisher):
    """Results per camera, in arrival order; ``wait`` blocks until a camera has ``n`` of them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.results: dict[str, list[FrameResult]] = {}
        self.errors: list[FrameError] = []

    def publish_result(self, result: FrameResult) -> None:
        with self._cond:
            self.results.setdefault(result.camera, []).append(result)
            self._cond.notify_all()

    def publish_error(self, err: FrameError) -> None:
        with self._cond:
            self.errors.append(err)
            self._cond.notify_all()

    def wait(self, camera: str, n: int, timeout: float = 120.0) -> FrameResult:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.results.get(camera, ())) >= n or bool(self.errors), timeout):
                raise TimeoutError(f"camera {camera}: {len(self.results.get(camera, ()))} of {n} results "
                                   f"after {timeout} s")
            if self.errors:
                raise RuntimeError(f"frame errors: {self.errors}")
            return self.results[camera][n - 1]


@dataclass
class RouteTiming:
    """Median of ``repeats`` copies of the packed state from one GPU to the other."""

    nbytes: int
    peer_ms: float | None = None
    host_ms: float | None = None
    peer_access: bool = False
    note: str = ""


@dataclass
class MoveReport:
    backend_a: str
    backend_b: str
    devices: tuple[int | None, int | None]
    frames_before: int
    frames_after: int
    state_bytes: int
    feature_bytes: int
    export_ms: float
    import_ms: float
    decisions_stay: list[str] = field(default_factory=list)
    decisions_moved: list[str] = field(default_factory=list)
    decisions_cold: list[str] = field(default_factory=list)
    boxes_stay: list[int] = field(default_factory=list)
    max_box_diff_px: float = 0.0
    max_score_diff: float = 0.0
    same_decisions: bool = False
    same_detections: bool = False
    features_equal: bool | None = None
    route: RouteTiming | None = None
    moved_by: str = "bytes"

    @property
    def ok(self) -> bool:
        return self.same_decisions and self.same_detections and self.features_equal is not False


def _config(model_path: Path, cameras: Sequence[str], device: int | None, threads: int, batch: int) -> Config:
    from daemon.config.loader import parse_config

    cams = "".join(f"  - id: {c}\n    source: {{type: replay, path: x.avi, realtime: false, loop: false}}\n"
                   for c in cameras)
    gpu = "" if device is None else f", gpu_device: {device}"
    return parse_config(
        "version: 1\nnode: {site: m, area: m, line: m, node: m}\n"
        f"model: {{path: {model_path}, threads: {threads}{gpu}}}\ncameras:\n{cams}"
        f"batching: {{max_batch: {batch}, max_wait_ms: 1}}\nstats: {{interval_s: 100}}\n"
        # keyframes by frame count only: both runtimes see the same frames at different wall-clock times
        "delta: {enabled: true, keyframe_frames: 30, keyframe_s: 3600}\n"
    )


def _rows(dets: Sequence[Detection]) -> np.ndarray:
    return np.array([[d.class_id, d.score, d.x1, d.y1, d.x2, d.y2, float(d.cached)] for d in dets],
                    np.float64).reshape(-1, 7)


def compare(a: Sequence[Detection], b: Sequence[Detection]) -> tuple[bool, float, float]:
    """(same boxes in the same order: count, classes, cached flags; largest coordinate and score differences)."""
    ra, rb = _rows(a), _rows(b)
    if ra.shape != rb.shape:
        return False, float("inf"), float("inf")
    if not len(ra):
        return True, 0.0, 0.0
    same = bool(np.array_equal(ra[:, 0], rb[:, 0]) and np.array_equal(ra[:, 6], rb[:, 6]))
    return same, float(np.abs(ra[:, 2:6] - rb[:, 2:6]).max()), float(np.abs(ra[:, 1] - rb[:, 1]).max())


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:]) * 1e3


def device_move(state: Any, src: int, dst: int, repeats: int = 20) -> tuple[Any, RouteTiming]:
    """Pack ``state`` into one blob on GPU ``src``, copy it to ``dst`` peer to peer and through host memory
    (timed), and return the state unpacked from the peer copy (its arrays live on ``dst``)."""
    import cupy

    from daemon.features import state as st
    from daemon.features.codec import to_host

    head, blob = st.pack(state)
    with cupy.cuda.Device(src):
        on_src = cupy.asarray(blob)
        cupy.cuda.Device(src).synchronize()
    peer = bool(cupy.cuda.runtime.deviceCanAccessPeer(src, dst))
    if peer:
        for here, there in ((src, dst), (dst, src)):
            with cupy.cuda.Device(here):
                try:
                    cupy.cuda.runtime.deviceEnablePeerAccess(there)
                except cupy.cuda.runtime.CUDARuntimeError:
                    pass  # already enabled
    timing = RouteTiming(int(on_src.nbytes), peer_access=peer)

    def by_peer() -> Any:
        out = st.move_blob(on_src, dst, peer=True)
        cupy.cuda.Device(dst).synchronize()
        return out

    def by_host() -> Any:
        data = head + to_host(on_src).tobytes()
        with cupy.cuda.Device(dst):
            moved = st.from_bytes(data, time.monotonic(), device=True)
            cupy.cuda.Device(dst).synchronize()
        return moved

    timing.peer_ms = _median_ms(by_peer, repeats)
    timing.host_ms = _median_ms(by_host, repeats)
    if not peer:
        timing.note = "no peer access between these GPUs: the 'peer' copy was staged by the driver"
    with cupy.cuda.Device(dst):
        moved = st.unpack(head, by_peer(), time.monotonic())
    return moved, timing


def run_move_check(model_path: Path, jpegs: Sequence[bytes], split: int,
                   devices: tuple[int | None, int | None] = (None, None), threads: int = 1,
                   features: Sequence[np.ndarray] | None = None, device_route: bool = False,
                   repeats: int = 20) -> MoveReport:
    from daemon.features.cache import FeatureCache

    if not 0 < split < len(jpegs):
        raise ValueError(f"split {split} must leave frames on both sides of {len(jpegs)}")
    sources: dict[tuple[str, str], ManualSource] = {}

    def factory(rt_name: str) -> Callable[[CameraConfig, Callable[[Item], object]], Source]:
        def make(cam: CameraConfig, sink: Callable[[Item], object]) -> Source:
            src = ManualSource(cam.id, sink)
            sources[(rt_name, cam.id)] = src
            return src
        return make

    ca, cb = Collector(), Collector()
    a = Runtime(_config(model_path, ["stay", "move"], devices[0], threads, 1), [ca], source_factory=factory("a"))
    b = Runtime(_config(model_path, ["move", "cold"], devices[1], threads, 1), [cb], source_factory=factory("b"))
    a.start()
    b.start()
    try:
        if features is not None:
            a.feature_cache, b.feature_cache = FeatureCache(), FeatureCache()
            a.feature_cache.put("move", [np.array(f) for f in features])
        for i in range(split):
            for cam in ("stay", "move"):
                sources[("a", cam)].push(jpegs[i])
                ca.wait(cam, i + 1)
        state = a.export_camera_state("move", wait_s=5.0)
        t = time.perf_counter()
        data = a.export_camera("move")  # what a cluster move sends: the state as DYCS v1 bytes
        export_ms = (time.perf_counter() - t) * 1e3
        route = None
        moved_by = "bytes"
        t = time.perf_counter()
        if device_route and devices[0] is not None and devices[1] is not None:
            moved, route = device_move(state, devices[0], devices[1], repeats)
            t = time.perf_counter()
            b.import_camera_state("move", moved)
            moved_by = "device buffer, peer copy"
        else:
            b.import_camera("move", data)
        import_ms = (time.perf_counter() - t) * 1e3
        feats_equal = None
        if features is not None and b.feature_cache is not None:
            from daemon.features.codec import to_host

            got = b.feature_cache.get("move") or []
            feats_equal = len(got) == len(features) and all(
                np.array_equal(to_host(g), f) for g, f in zip(got, features, strict=True))
        for i in range(split, len(jpegs)):
            sources[("a", "stay")].push(jpegs[i])
            ca.wait("stay", i + 1)
            for cam in ("move", "cold"):
                sources[("b", cam)].push(jpegs[i])
                cb.wait(cam, i - split + 1)
    finally:
        a.stop(20)
        b.stop(20)
    stay = ca.results["stay"][split:]
    moved_r, cold = cb.results["move"], cb.results["cold"]
    report = MoveReport(
        _backend(a), _backend(b), devices, split, len(jpegs) - split, len(data),
        state.nbytes - (0 if state.signature is None else int(state.signature.nbytes)), export_ms, import_ms,
        [r.decision for r in stay], [r.decision for r in moved_r], [r.decision for r in cold],
        [len(r.detections) for r in stay], features_equal=feats_equal, route=route, moved_by=moved_by,
    )
    report.same_decisions = report.decisions_stay == report.decisions_moved
    same = True
    for s, m in zip(stay, moved_r, strict=True):
        eq, dbox, dscore = compare(s.detections, m.detections)
        same &= eq
        report.max_box_diff_px = max(report.max_box_diff_px, dbox)
        report.max_score_diff = max(report.max_score_diff, dscore)
    exact = devices[0] == devices[1]  # same device (or both CPU): bit-identical; two GPUs: within rounding
    report.same_detections = same and (report.max_box_diff_px == 0.0 and report.max_score_diff == 0.0 if exact
                                       else report.max_box_diff_px <= 0.5 and report.max_score_diff <= 1e-3)
    return report


def _backend(rt: Runtime) -> str:
    snap = rt.latest_stats()
    return snap.backend if snap is not None else ""


def features_for(model_path: Path, jpeg: bytes) -> list[np.ndarray]:
    """yolov8n's reference feature maps for one frame (FP16, the form a features-mode camera keeps)."""
    from daemon.decode.jpeg import decode_jpeg
    from daemon.decode.letterbox import letterbox_into
    from daemon.features.engine import FeatureDeltaRunner
    from daemon.features.split import split_model
    from daemon.inference.model import load_model

    runner = FeatureDeltaRunner(split_model(load_model(model_path)), threads=4)
    x = np.zeros((1, 3, 640, 640), np.float32)
    letterbox_into(decode_jpeg(jpeg, 40_000_000), 640, x[0])
    _raw, maps = runner.full(x)
    return [np.ascontiguousarray(m, dtype=np.float16) for m in maps[0]]


def main(argv: Sequence[str] | None = None) -> int:
    from daemon.models.fetch import ensure
    from daemon.sources.replay import load_jpeg_frames

    p = argparse.ArgumentParser(prog="python3 -m cluster.movecheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs=2, default=None, help="GPU of runtime A and of runtime B")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--split", type=int, default=12)
    p.add_argument("--features", action="store_true", help="attach yolov8n reference feature maps (FP16)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=4, help="CPU inference threads (CPU path)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = ensure("yolov8n")
    jpegs = load_jpeg_frames(ensure("vtest"), 90, args.frames)
    feats = features_for(model, jpegs[args.split - 1]) if args.features else None
    devices: tuple[int | None, int | None] = (args.devices[0], args.devices[1]) if args.devices else (None, None)
    report = run_move_check(model, jpegs, args.split, devices, args.threads, feats,
                            device_route=args.devices is not None, repeats=args.repeats)
    out = {**asdict(report), "ok": report.ok}
    print(json.dumps(out, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Collector", "ManualSource", "MoveReport", "RouteTiming", "compare", "device_move", "features_for",
           "run_move_check"]
