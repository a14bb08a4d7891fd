"""The feature stage's logic that is the same on both paths, run on the CPU: crop buckets (what the GPU path uses
to bound input shapes), copy-on-write references, several frames of a camera in one batch, imported maps of
another dtype, and where the GPU stage is built or why not (the demotion to crops mode)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from daemon.backend import EngineChoice
from daemon.config.loader import parse_config
from daemon.config.model import Config
from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.delta.policy import Decision, Rect, Verdict
from daemon.features.cache import Crop, FeatureCache, plan_crops
from daemon.features.engine import DEFAULT_HALOS, FeatureDeltaRunner, bucket_crops
from daemon.features.live import FeatureStage
from daemon.features.split import SplitModel, relative_difference, split_model
from daemon.inference.model import LoadedModel, load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.pipeline.prepare import Prepared
from daemon.sources.replay import load_jpeg_frames
from daemon.types import Frame, Letterbox

HW = (640, 640)
LB = Letterbox(768, 576, 640 / 768, 0.0, 80.0)
HAS_CUPY = importlib.util.find_spec("cupy") is not None


@pytest.fixture(scope="module")
def model(model_path: Path) -> LoadedModel:
    return load_model(model_path)


@pytest.fixture(scope="module")
def split(model: LoadedModel) -> SplitModel:
    return split_model(model)


@pytest.fixture(scope="module")
def frames(vtest_path: Path) -> np.ndarray:
    """vtest frames 0, 4 and 8, letterboxed: (3, 3, 640, 640)."""
    jpegs = load_jpeg_frames(vtest_path, limit=9)
    x = np.zeros((3, 3, *HW), np.float32)
    for row, i in enumerate((0, 4, 8)):
        letterbox_into(decode_jpeg(jpegs[i], 40_000_000), HW, x[row])
    return x


@pytest.fixture(scope="module")
def runner(split: SplitModel) -> FeatureDeltaRunner:
    return FeatureDeltaRunner(split, DEFAULT_HALOS, threads=2)


@pytest.mark.parametrize(
    ("box", "bucket", "want"),
    [
        (Rect(64, 96, 352, 384), 64, Rect(64, 96, 384, 416)),  # 288 -> 320 per side, grown right and down
        (Rect(416, 480, 640, 640), 64, Rect(384, 448, 640, 640)),  # 224 x 160 at the corner: grown left and up
        (Rect(0, 0, 640, 640), 64, Rect(0, 0, 640, 640)),
        (Rect(96, 0, 160, 32), 128, Rect(96, 0, 224, 128)),
        (Rect(96, 0, 160, 32), 0, Rect(96, 0, 160, 32)),  # off: as planned
    ],
)
def test_bucket_grows_crops_inside_the_input(box: Rect, bucket: int, want: Rect) -> None:
    pastes = (Rect(box.x1 + 8, box.y1, box.x2, box.y2),)
    (got,) = bucket_crops([Crop(box, pastes)], bucket, HW, 32)
    assert got == Crop(want, pastes)  # the pastes stay: they only gain context
    b = got.box
    assert b.x1 <= box.x1 and b.y1 <= box.y1 and b.x2 >= box.x2 and b.y2 >= box.y2
    assert 0 <= b.x1 and 0 <= b.y1 and b.x2 <= 640 and b.y2 <= 640 and b.x1 % 32 == 0 and b.y1 % 32 == 0


def test_bucketed_crops_have_few_shapes() -> None:
    rng = np.random.default_rng(1)
    shapes = set()
    for _ in range(300):
        x, y = (int(v) for v in rng.integers(0, 600, 2))
        w, h = (int(v) for v in rng.integers(8, 200, 2))
        for c in bucket_crops(plan_crops([Rect(x, y, min(640, x + w), min(640, y + h))], DEFAULT_HALOS, (8, 16, 32),
                                          HW), 64, HW, 32):
            shapes.add((c.height, c.width))
    assert len(shapes) <= 64 and all(h % 64 == 0 and w % 64 == 0 for h, w in shapes), shapes


def test_bucket_must_be_a_multiple_of_the_largest_stride(split: SplitModel) -> None:
    with pytest.raises(ValueError, match="multiple of the largest stride 32"):
        bucket_crops([Crop(Rect(0, 0, 64, 64), ())], 48, HW, 32)
    with pytest.raises(ValueError, match="multiple of the largest stride 32"):
        FeatureDeltaRunner(split, threads=1, bucket=48)


def test_bucketed_regions_reproduce_full_frame_features(split: SplitModel, frames: np.ndarray) -> None:
    """What the GPU path runs (crops grown to 64 px steps), here on the CPU: the region's cells equal the full
    frame's as closely as unbucketed crops do, and cells far from the crop keep the reference."""
    runner = FeatureDeltaRunner(split, DEFAULT_HALOS, threads=2, bucket=64)
    _, maps_a = runner.full(frames[:1])
    _, maps_b = runner.full(frames[2:3])
    ref = [m.copy() for m in maps_a[0]]
    region = Rect(256, 224, 384, 352)
    s = runner.recompute(frames[2], ref, [region])
    assert all(c.height % 64 == 0 and c.width % 64 == 0 for c in s.crops)
    assert s.crop_pixels == sum(c.box.area for c in s.crops) < 640 * 640
    for tap, got, want, before in zip(split.taps, ref, maps_b[0], maps_a[0], strict=True):
        st = tap.stride
        inner = (slice(None), slice(region.y1 // st, region.y2 // st), slice(region.x1 // st, region.x2 // st))
        assert float(np.abs(got[inner] - want[inner]).max()) <= 0.01 * float(np.abs(want).max())
        assert np.array_equal(got[:, :2], before[:, :2])


def _item(camera: str, seq: int, decision: Decision, regions: tuple[Rect, ...] = ()) -> Prepared:
    frame = Frame(camera, seq, 0.0, 0.0, jpeg=b"x")
    return Prepared(frame, Verdict(decision, "test", regions), seq, (), LB, (0, 0), 768, 576, 0, 0.0, 1.0, None,
                    features=True)


def test_stage_batches_the_head_and_never_writes_a_reference_in_place(runner: FeatureDeltaRunner,
                                                                      frames: np.ndarray) -> None:
    """Three frames of one camera in one call (FULL, REGIONS, REGIONS): each REGIONS frame starts from the maps
    its predecessor left, the rows equal frame-by-frame runs, and maps handed out earlier never change."""
    cache = FeatureCache()
    stage = FeatureStage(runner, cache)
    stage.set_cameras(["cam"])
    region = (Rect(256, 224, 384, 352),)
    items = [_item("cam", 0, Decision.FULL), _item("cam", 1, Decision.REGIONS, region),
             _item("cam", 2, Decision.REGIONS, region)]
    got = stage.infer(frames, items)
    assert got.raw.shape[0] == 3 and got.raw.dtype == np.float32
    assert got.work[0] == 1.0 and 0.3 < got.work[1] < 1.0 and got.work[2] == got.work[1]
    # the same frames one at a time, on explicit copies
    raw0, maps = runner.full(frames[:1])
    ref = maps[0]
    want = [raw0]
    for k in (1, 2):
        ref = [m.copy() for m in ref]
        want.append(runner.regions(frames[k], ref, region).raw)
    for k in range(3):
        assert relative_difference(got.raw[k : k + 1], want[k]) <= 1e-5
    final = cache.get("cam")
    assert final is not None and all(np.array_equal(a, b) for a, b in zip(final, ref, strict=True))
    # a reference handed out (an export) stays as it was while later frames splice
    held = cache.get("cam")
    snapshot = [m.copy() for m in held or ()]
    stage.infer(frames[1:2], [_item("cam", 3, Decision.REGIONS, (Rect(0, 0, 320, 320),))])
    assert all(np.array_equal(a, b) for a, b in zip(held or (), snapshot, strict=True))
    assert cache.get("cam") is not held
    assert stage.rows == 4 and stage.busy_s > 0


def test_stage_adopts_imported_maps_and_recomputes_unusable_ones(runner: FeatureDeltaRunner, split: SplitModel,
                                                                 frames: np.ndarray) -> None:
    """An imported state's maps may be FP16 (a GPU exported them) and read-only views: they are adopted as
    writable FP32 copies; maps of other shapes (another split) make the frame run whole."""
    cache = FeatureCache()
    stage = FeatureStage(runner, cache)
    stage.set_cameras(["cam"])
    _, maps = runner.full(frames[:1])
    half = [m.astype(np.float16) for m in maps[0]]
    for m in half:
        m.flags.writeable = False
    cache.put("cam", list(half))
    region = (Rect(256, 224, 384, 352),)
    got = stage.infer(frames[1:2], [_item("cam", 1, Decision.REGIONS, region)])
    assert got.work[0] < 1.0
    mine = cache.get("cam")
    assert mine is not None and all(m.dtype == np.float32 and m.flags.writeable for m in mine)
    cache.put("cam", [np.zeros((t.channels, t.height // 2, t.width // 2), np.float32) for t in split.taps])
    got = stage.infer(frames[1:2], [_item("cam", 2, Decision.REGIONS, region)])
    assert got.work == (1.0,)
    assert [m.shape for m in cache.get("cam") or ()] == [(t.channels, t.height, t.width) for t in split.taps]


def _cfg(model_path: Path, mode: str) -> Config:
    return parse_config(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}, threads: 1}}\ncameras:\n"
        "  - id: feat\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        f"    delta: {{enabled: true, mode: {mode}}}\n"
        "  - id: plain\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
    )


@pytest.mark.skipif(HAS_CUPY, reason="CuPy is installed: the GPU stage can be built here (tests/test_features_gpu.py)")
def test_gpu_path_without_the_gpu_stage_runs_crops_mode_and_says_why(model: LoadedModel, model_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from daemon.app import feature_stage_for
    from daemon.features.gpu import FeatureStageUnavailable, build_gpu_stage

    with pytest.raises(FeatureStageUnavailable, match="CuPy is not installed"):
        build_gpu_stage(model, FeatureCache())
    gpu = EngineChoice(OnnxRuntimeEngine(model, max_batch=1), "gpu:dali+onnxruntime-cuda", "test",
                       gpu_decoder=object())
    with caplog.at_level(logging.WARNING, logger="daemon.app"):
        assert feature_stage_for(_cfg(model_path, "features"), gpu, FeatureCache()) is None
    assert ("delta.mode features cannot run on gpu:dali+onnxruntime-cuda (FeatureStageUnavailable: CuPy is not "
            "installed") in caplog.text
    assert "feat use crops mode" in caplog.text


def test_cpu_path_builds_the_host_stage_for_features_cameras_only(model: LoadedModel, model_path: Path) -> None:
    from daemon.app import feature_stage_for

    cpu = EngineChoice(OnnxRuntimeEngine(model, max_batch=1), "cpu:onnxruntime", "test")
    assert feature_stage_for(_cfg(model_path, "crops"), cpu, FeatureCache()) is None
    stage = feature_stage_for(_cfg(model_path, "features"), cpu, FeatureCache())
    assert stage is not None and stage.wants("feat") and not stage.wants("plain")
    assert stage.runner.xp is np and stage.runner.bucket == 0


def test_gpu_feature_module_imports_without_gpu_packages() -> None:
    import sys

    importlib.import_module("daemon.features.gpu")
    if not HAS_CUPY:
        assert "cupy" not in sys.modules


def test_engine_rows_then_feature_rows() -> None:
    from daemon.pipeline.runner import concat_rows

    a, b = np.zeros((2, 5, 7), np.float32), np.ones((1, 5, 7), np.float32)
    got = concat_rows(a[:2], b)
    assert got.shape == (3, 5, 7) and got[2].min() == 1.0 and got[:2].max() == 0.0
