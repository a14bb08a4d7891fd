"""The backbone/head split of the real YOLOv8n export, checked on real vtest frames; crop planning and splicing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.delta.policy import Rect
from daemon.features.cache import FeatureCache, plan_crops, shrink
from daemon.features.engine import FeatureDeltaRunner
from daemon.features.split import SplitError, SplitModel, find_cut, relative_difference, split_model
from daemon.inference.model import LoadedModel, load_model
from daemon.inference.onnxrt import make_session
from daemon.sources.replay import load_jpeg_frames

HW = (640, 640)


@pytest.fixture(scope="module")
def model(model_path: Path) -> LoadedModel:
    return load_model(model_path)


@pytest.fixture(scope="module")
def frames(vtest_path: Path) -> np.ndarray:
    """Frames 0 and 8 of vtest, letterboxed as the pipeline does: (2, 3, 640, 640)."""
    jpegs = load_jpeg_frames(vtest_path, limit=9)
    x = np.zeros((2, 3, *HW), np.float32)
    for row, i in enumerate((0, 8)):
        letterbox_into(decode_jpeg(jpegs[i], 40_000_000), HW, x[row])
    return x


@pytest.fixture(scope="module")
def reference(model: LoadedModel, frames: np.ndarray) -> np.ndarray:
    out: np.ndarray = make_session(model.onnx_bytes, 2).run([model.output_name], {model.input_name: frames})[0]
    return out


@pytest.fixture(scope="module")
def local(model: LoadedModel) -> SplitModel:
    return split_model(model, "local")


@pytest.mark.parametrize(("kind", "layers"), [("local", (4, 6, 8)), ("backbone", (4, 6, 9)), ("neck", (15, 18, 21))])
def test_split_reproduces_the_model_on_vtest(model: LoadedModel, frames: np.ndarray, reference: np.ndarray,
                                             kind: str, layers: tuple[int, ...]) -> None:
    split = split_model(model, kind)
    assert [t.stride for t in split.taps] == [8, 16, 32]
    assert [t.name.split("/")[1] for t in split.taps] == [f"model.{i}" for i in layers]
    assert split.feature_bytes_fp32 == 4 * (64 * 80 * 80 + 128 * 40 * 40 + 256 * 20 * 20)
    back = make_session(split.backbone_bytes, 2)
    head = make_session(split.head_bytes, 2)
    maps = back.run(None, {model.input_name: frames})  # a batch of 2: both halves stay batchable
    out = head.run(None, {t.name: m for t, m in zip(split.taps, maps, strict=True)})[0]
    assert out.shape == reference.shape
    assert relative_difference(out, reference) <= 1e-4


def test_local_cut_leaves_most_work_to_the_head(local: SplitModel) -> None:
    # YOLOv8n: layers 0-8 are about a third of the convolution work; SPPF, the neck and Detect the rest
    assert 0.25 < local.backbone_share < 0.45
    assert local.backbone_macs + local.head_macs > 4e9


def test_explicit_cut_equals_the_automatic_one(model: LoadedModel, local: SplitModel) -> None:
    explicit = split_model(model, [t.name for t in reversed(local.taps)])
    assert explicit.kind == "config"
    assert explicit.taps == local.taps


def test_cut_errors_name_the_tensor(model: LoadedModel) -> None:
    with pytest.raises(SplitError, match="nope"):
        split_model(model, ["nope"])
    with pytest.raises(SplitError, match="does not separate"):
        split_model(model, ["/model.6/cv2/act/Mul_output_0"])  # layer 14 reads layer 4 too
    with pytest.raises(SplitError, match="unknown cut"):
        split_model(model, "middle")


def test_find_cut_needs_ultralytics_names() -> None:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(SplitError, match="explicitly"):
        find_cut(helper.make_model(graph), "local")


def test_plan_crops_aligns_merges_and_shrinks() -> None:
    crops = plan_crops([Rect(100, 130, 150, 170)], (64, 96, 128), (8, 16, 32), HW)
    assert len(crops) == 1
    c = crops[0]
    assert c.box == Rect(0, 0, 288, 320)  # aligned to (96, 128, 160, 192), grown by 128, clipped at 0
    assert c.pastes[0] == Rect(0, 0, 224, 256)  # image-border sides are exact and stay
    assert c.pastes[2] == Rect(0, 0, 160, 192)
    two = plan_crops([Rect(64, 96, 128, 160), Rect(128, 96, 192, 160)], (32, 32, 32), (8, 16, 32), HW)
    assert len(two) == 1  # overlapping crops merge when that costs no more pixels
    far = plan_crops([Rect(0, 0, 32, 32), Rect(576, 576, 640, 640)], (32, 32, 32), (8, 16, 32), HW)
    assert len(far) == 2
    assert shrink(Rect(64, 64, 320, 320), 40, 16, 640, 640) == Rect(112, 112, 272, 272)


def test_regions_splice_reproduces_full_frame_features(model: LoadedModel, local: SplitModel,
                                                       frames: np.ndarray) -> None:
    runner = FeatureDeltaRunner(local, (64, 96, 128), threads=2)
    _, maps_a = runner.full(frames[:1])
    raw_b, maps_b = runner.full(frames[1:])
    ref = [m.copy() for m in maps_a[0]]
    region = Rect(256, 224, 384, 352)
    res = runner.regions(frames[1], ref, [region])
    assert res.crop_pixels == res.crops[0].box.area < 640 * 480
    for tap, got, want, before in zip(local.taps, ref, maps_b[0], maps_a[0], strict=True):
        s = tap.stride
        inner = (slice(None), slice(region.y1 // s, region.y2 // s), slice(region.x1 // s, region.x2 // s))
        scale = float(np.abs(want).max())
        assert float(np.abs(got[inner] - want[inner]).max()) <= 0.01 * scale  # stride 32: ~0.3 % measured
        assert np.array_equal(got[:, :2], before[:, :2])  # far from the crop: the reference stays
    # a region covering the whole input is the full model
    whole = [m.copy() for m in maps_a[0]]
    res = runner.regions(frames[1], whole, [Rect(0, 0, 640, 640)])
    assert relative_difference(res.raw, raw_b) <= 1e-4
    assert runner.work_fraction(640 * 640) == pytest.approx(1.0)
    assert runner.work_fraction(0) == pytest.approx(1 - local.backbone_share)


def test_feature_cache_holds_per_camera_maps(local: SplitModel) -> None:
    cache = FeatureCache()
    maps = [np.zeros((t.channels, t.height, t.width), np.float32) for t in local.taps]
    cache.put("cam1", maps)
    assert cache.get("cam1") is maps
    assert cache.nbytes() == local.feature_bytes_fp32
    assert cache.drop("cam1") and cache.get("cam1") is None and not cache.drop("cam1")


def _toy(attention: bool) -> object:
    """A graph named like an Ultralytics export: 0-2 convolution stand-ins, 3 SPPF (MaxPool), [4 C2PSA
    (MatMul) as in YOLOv11,] then an upsample, a concat and the Detect layer."""
    from onnx import TensorProto, helper

    ops = [("Relu", ["x"], "a0"), ("Relu", ["a0"], "a1"), ("Relu", ["a1"], "a2"), ("MaxPool", ["a2"], "a3")]
    if attention:
        ops.append(("MatMul", ["a3", "a3"], "a3b"))
    top = ops[-1][2]
    ops += [("Resize", [top], "up"), ("Concat", ["up", "a1"], "cat"), ("Add", ["cat", "a2"], "y")]
    nodes = [helper.make_node(op, ins, [out], name=f"/model.{i}/{op}") for i, (op, ins, out) in enumerate(ops)]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    return helper.make_model(helper.make_graph(nodes, "toy", io[:1], io[1:]))


@pytest.mark.parametrize("attention", [False, True])
def test_find_cut_on_ultralytics_layer_structure(attention: bool) -> None:
    proto = _toy(attention)
    assert find_cut(proto, "local") == ["a2", "a1"]  # before SPPF: what later layers read of layers 0-2
    top = "a3b" if attention else "a3"
    assert sorted(find_cut(proto, "backbone")) == sorted([top, "a1", "a2"])
    assert sorted(find_cut(proto, "neck")) == ["a2", "cat"]
