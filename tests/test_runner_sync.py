"""The runner's stage-ordering contract (StageSync), on the CPU path with the real model and video.

On the GPU, CudaStages gives each stage thread its own CUDA stream and orders them with events; what must hold
everywhere is the protocol: each stage binds on its own thread before its loop, the infer stage waits on the
token the pre stage marked for that batch, and the post stage waits on the token the infer stage marked. The
recording implementation below checks exactly that while the real pipeline runs (a GPU cannot exist in CI)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.loader import parse_config
from daemon.inference.model import load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.outputs.jsonl import JsonlPublisher
from tests.runtime_helpers import replay_to_end, vtest_jpegs


class RecordingSync:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bound: dict[str, str] = {}  # stage -> thread name
        self.marks: dict[int, str] = {}  # token -> stage that marked it
        self.waits: list[tuple[str, str]] = []  # (waiting stage, stage whose token it was)
        self._n = 0

    def _stage(self) -> str:
        name = threading.current_thread().name
        return next((s for s, t in self.bound.items() if t == name), f"unbound:{name}")

    def bind(self, stage: str) -> None:
        with self.lock:
            self.bound[stage] = threading.current_thread().name

    def mark(self) -> Any:
        with self.lock:
            self._n += 1
            self.marks[self._n] = self._stage()
            return self._n

    def wait(self, token: Any) -> None:
        with self.lock:
            self.waits.append((self._stage(), self.marks.get(token, "unknown")))


def test_stages_bind_their_threads_and_wait_on_the_previous_stage(tmp_path: Path, model_path: Path,
                                                                  vtest_path: Path) -> None:
    cfg = parse_config(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}}}\n"
        "cameras:\n"
        f"  - id: a\n    source: {{type: replay, path: {vtest_path}, realtime: false, loop: false}}\n"
        f"  - id: b\n    source: {{type: replay, path: {vtest_path}, realtime: false, loop: false}}\n"
        "batching: {max_batch: 4, max_wait_ms: 5}\nstats: {interval_s: 0.5}\n"
    )
    sync = RecordingSync()
    model = load_model(model_path)
    choice = EngineChoice(OnnxRuntimeEngine(model, max_batch=4, threads=2), "cpu:onnxruntime", "test", sync=sync)
    rt = Runtime(cfg, [JsonlPublisher(str(tmp_path / "d.jsonl"))], engine=choice)
    rt.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(c.processed for c in rt.stats.snapshot([], 1).cameras) < 12:
            time.sleep(0.2)
    finally:
        rt.stop(10)
    assert set(sync.bound) == {"pre", "infer", "post"}
    assert len(set(sync.bound.values())) == 3  # three threads, one stage each
    assert sync.waits, "no stage waited on another"
    assert set(sync.waits) == {("infer", "pre"), ("post", "infer")}
    infer_waits = sum(1 for w in sync.waits if w[0] == "infer")
    post_waits = sum(1 for w in sync.waits if w[0] == "post")
    assert infer_waits >= 3 and post_waits == infer_waits


class _ShapeRecorder(OnnxRuntimeEngine):
    def __init__(self, *a: Any, **k: Any) -> None:
        self.rows: list[int] = []
        super().__init__(*a, **k)
        self.rows.clear()  # the engine's own warm-up

    def infer(self, batch: Any) -> Any:
        self.rows.append(int(batch.shape[0]))
        return super().infer(batch)


def test_pad_to_batch_runs_one_shape_and_publishes_only_real_frames(tmp_path: Path, model_path: Path,
                                                                     vtest_path: Path) -> None:
    """The GPU path's one-shape rule, on the CPU: every engine call gets max_batch rows, partial batches included,
    and only the real frames' results come out (one per frame of a 5-frame camera with batches of 4)."""
    cfg = parse_config(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}}}\ncameras:\n"
        "  - id: a\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        "batching: {max_batch: 4, max_wait_ms: 5}\nstats: {interval_s: 100}\n"
    )
    engine = _ShapeRecorder(load_model(model_path), max_batch=4, threads=2)
    choice = EngineChoice(engine, "cpu:onnxruntime", "test", pad_to_batch=True)
    records = replay_to_end(cfg, choice, vtest_jpegs(vtest_path, 5), tmp_path / "d.jsonl")
    assert [r["seq"] for r in records if r["kind"] == "detections"] == [0, 1, 2, 3, 4]
    assert engine.rows and set(engine.rows) == {4}
