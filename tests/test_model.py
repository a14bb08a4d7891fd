"""daemon.inference.model and onnxrt: the real YOLOv8n export plus small ONNX graphs built here."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.inference.model import LoadedModel, ModelError, load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine

SIDE = 16  # synthetic input [B,3,16,16] = 768 values per image


def _graph_model(
    path: Path,
    shapes: Sequence[Sequence[int]],
    batch: int | str = 1,
    names: str | None = None,
    extra_input: bool = False,
    in_channels: int = 3,
    outputs: int = 1,
    meta: dict[str, str] | None = None,
    hw: tuple[int | str, int | str] = (SIDE, SIDE),
    out_dims: Sequence[int | str] | None = None,
) -> Path:
    """X [batch,C,H,W] -> Mul(X, 2) -> Reshape(shape_0) -> ... -> Y. Reshape targets are initializers."""
    nodes = [helper.make_node("Mul", ["X", "two"], ["x2"])]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    prev = "x2"
    for i, shape in enumerate(shapes):
        inits.append(numpy_helper.from_array(np.array(shape, np.int64), f"shape{i}"))
        nodes.append(helper.make_node("Reshape", [prev, f"shape{i}"], [f"r{i}"]))
        prev = f"r{i}"
    out_shape: list[int | str] = [batch, *shapes[-1][1:]] if out_dims is None else list(out_dims)
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)]
    nodes.append(helper.make_node("Identity", [prev], ["Y"]))
    for k in range(1, outputs):
        nodes.append(helper.make_node("Identity", [prev], [f"Y{k}"]))
        outs.append(helper.make_tensor_value_info(f"Y{k}", TensorProto.FLOAT, out_shape))
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, in_channels, *hw])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1]))
    graph = helper.make_graph(nodes, "synthetic", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    all_meta = dict(meta or {})
    if names is not None:
        all_meta["names"] = names
    helper.set_model_props(model, all_meta)
    onnx.save(model, str(path))
    return path


# -- the real export --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real(model_path: Path) -> LoadedModel:
    return load_model(model_path)


def test_real_yolov8n(real: LoadedModel, model_path: Path) -> None:
    assert real.layout == "anchors_last"
    assert real.num_classes == 80
    assert real.class_names[0] == "person"
    assert real.class_names[79] == "toothbrush"
    assert len(real.class_names) == 80
    assert real.input_name == "images"
    assert real.output_name == "output0"
    assert real.input_hw == (640, 640)
    assert real.batch_dynamic is False
    assert real.made_batchable is True
    assert real.batchable
    assert real.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    graph = onnx.load_from_string(real.onnx_bytes).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "onnx_bytes" not in repr(real)


def test_real_engine_batches_and_checks_shapes(real: LoadedModel) -> None:
    engine = OnnxRuntimeEngine(real, max_batch=2, threads=2)
    try:
        x = np.random.default_rng(0).random((2, 3, 640, 640), dtype=np.float32)
        out = engine.infer(x)
        assert out.shape == (2, 84, 8400)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out[1:], engine.infer(x[1:]), atol=1e-4)
        with pytest.raises(ValueError, match=r"batch must be \(1\.\.2, 3, 640, 640\), got \(3, 3, 640, 640\)"):
            engine.infer(np.zeros((3, 3, 640, 640), np.float32))
        with pytest.raises(ValueError, match="got"):
            engine.infer(np.zeros((1, 3, 320, 320), np.float32))
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer(x)


def test_config_class_names_win_and_must_match(model_path: Path) -> None:
    names = tuple(f"part{i}" for i in range(80))
    assert load_model(model_path, class_names=names).class_names == names
    with pytest.raises(ModelError, match="output has 80 classes but configured class_names has 2"):
        load_model(model_path, class_names=("a", "b"))


# -- errors ---------------------------------------------------------------------------------------------------
def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"model {tmp_path / 'missing.onnx'}: not a file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelError, match="not a file"):
        load_model(tmp_path)


def test_not_onnx(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf \xff\xff\xff")
    with pytest.raises(ModelError, match=f"model {bad}: not an ONNX model"):
        load_model(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shapes": [[1, 6, 128]], "extra_input": True}, r"expected exactly 1 input, found 2: \['X', 'Z'\]"),
        ({"shapes": [[1, 256, 1, 1]], "in_channels": 1}, r"input 'X' must be \[B,3,H,W\], got \[1,1,16,16\]"),
        ({"shapes": [[1, 768]]}, r"output 'Y' must be 3-D \[B,...\], got \[1,768\]"),
        ({"shapes": [[1, 6, 128]], "outputs": 2}, "expected 1 output"),
        ({"shapes": [[1, 4, 192]]}, r"unknown output layout \[1,4,192\]"),
        ({"shapes": [[1, 192, 4]]}, r"unknown output layout \[1,192,4\]"),
        ({"shapes": [[1, 6, 128]], "batch": 4}, "fixed batch 4 is not supported"),
        ({"shapes": [[1, 6, 128]], "names": "{0: 'a', 1: 'b', 2: 'c'}"},
         "output has 2 classes but metadata 'names' has 3"),
        ({"shapes": [[1, 6, 128]], "hw": ("h", "w")}, "symbolic height/width and no usable 'imgsz'"),
        ({"shapes": [[1, 128, 128]]}, r"unknown output layout \[1,128,128\]"),
    ],
)
def test_model_errors_name_file_and_shapes(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    path = _graph_model(tmp_path / "m.onnx", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)


# -- layouts, names, batchability ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "declared", "layout", "num_classes"),
    [
        ([1, 6, 128], None, "anchors_last", 2),  # [B,4+C,N]
        ([1, 96, 8], None, "anchors_first", 3),  # [B,N,5+C]
        ([1, 128, 6], None, "end2end", 0),  # [B,N,6], no names: class count unknown
        ([1, 6, 128], ["b", 6, "anchors"], "anchors_last", 2),  # dynamic export: symbolic anchor count
        ([1, 96, 8], ["b", "anchors", 8], "anchors_first", 3),
    ],
)
def test_layouts(
    tmp_path: Path, shape: list[int], declared: list[int | str] | None, layout: str, num_classes: int
) -> None:
    model = load_model(_graph_model(tmp_path / "m.onnx", [shape], out_dims=declared))
    assert (model.layout, model.num_classes) == (layout, num_classes)
    assert model.class_names == tuple(f"class{i}" for i in range(num_classes))


def test_end2end_takes_class_count_from_names(tmp_path: Path) -> None:
    model = load_model(_graph_model(tmp_path / "m.onnx", [[1, 128, 6]], names="{0: 'bolt', 1: 'nut'}"))
    assert (model.layout, model.num_classes, model.class_names) == ("end2end", 2, ("bolt", "nut"))


def test_names_metadata_is_parsed_never_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    model = load_model(_graph_model(tmp_path / "m.onnx", [[1, 6, 128]], names=evil))
    assert model.class_names == ("class0", "class1")
    assert not marker.exists()


def test_dynamic_hw_uses_imgsz_metadata(tmp_path: Path) -> None:
    path = _graph_model(tmp_path / "m.onnx", [[1, 6, 128]], hw=("h", "w"), meta={"imgsz": "[16, 16]"})
    assert load_model(path).input_hw == (16, 16)


def test_dynamic_batch_model_is_left_alone(tmp_path: Path) -> None:
    path = _graph_model(tmp_path / "m.onnx", [[0, 6, 128]], batch="N")
    model = load_model(path)
    assert (model.batch_dynamic, model.made_batchable) == (True, False)
    assert model.onnx_bytes == path.read_bytes()


def test_batch1_reshape_graph_is_made_batchable(tmp_path: Path) -> None:
    path = _graph_model(tmp_path / "m.onnx", [[1, 3, 256], [1, 6, 128]])
    model = load_model(path)
    assert (model.batch_dynamic, model.made_batchable) == (False, True)
    x = np.random.default_rng(1).random((3, 3, SIDE, SIDE), dtype=np.float32)
    engine = OnnxRuntimeEngine(model, max_batch=3)
    out = engine.infer(x)
    np.testing.assert_array_equal(out, (x * 2).reshape(3, 6, 128))


def test_unbatchable_model_falls_back_to_a_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Reshape to the flat [768] bakes batch 1 in: the rewrite fails verification, the engine loops."""
    path = _graph_model(tmp_path / "m.onnx", [[768], [1, 6, 128]])
    with caplog.at_level(logging.WARNING, logger="daemon.inference.model"):
        model = load_model(path)
    assert (model.batch_dynamic, model.made_batchable, model.batchable) == (False, False, False)
    assert model.onnx_bytes == path.read_bytes()
    assert "could not be made batchable" in caplog.text
    engine = OnnxRuntimeEngine(model, max_batch=3, threads=1)
    x = np.random.default_rng(2).random((3, 3, SIDE, SIDE), dtype=np.float32)
    np.testing.assert_array_equal(engine.infer(x), (x * 2).reshape(3, 6, 128))


def test_engine_rejects_bad_arguments(tmp_path: Path) -> None:
    model = load_model(_graph_model(tmp_path / "m.onnx", [[1, 6, 128]]))
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        OnnxRuntimeEngine(model, max_batch=0)
    with pytest.raises(ValueError, match="threads must be >= 0, got -1"):
        OnnxRuntimeEngine(model, max_batch=1, threads=-1)
