"""Which YOLO head nodes stay in float: the head split found from the real yolov8n graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from daemon.quant.keep import KeepError, find_head, resolve_keep, strides


@pytest.fixture(scope="module")
def graph(model_path: Path) -> onnx.GraphProto:
    return onnx.load(str(model_path)).graph


def test_head_split_of_yolov8n(graph: onnx.GraphProto) -> None:
    parts = find_head(graph)
    assert parts.prefix == "/model.22/"
    assert (len(parts.head), len(parts.branch), len(parts.decode)) == (66, 42, 24)
    assert parts.entries == ("/model.15/cv2/act/Mul_output_0", "/model.18/cv2/act/Mul_output_0",
                             "/model.21/cv2/act/Mul_output_0")
    assert sorted(parts.last_convs) == sorted(
        f"/model.22/{b}.{i}/{b}.{i}.2/Conv" for b in ("cv2", "cv3") for i in range(3))
    assert "/model.22/dfl/conv/Conv" in parts.decode  # the DFL conv joins all scales: decode, not branch
    assert "/model.22/Concat_3" in parts.decode
    assert all("/cv2." in n or "/cv3." in n for n in parts.branch)


@pytest.mark.parametrize(
    ("keep", "count"),
    [
        (["decode"], 24),
        (["decode+last-convs"], 30),
        (["head"], 66),
        (["none"], 0),
        (["decode", "/model.22/cv3.0/"], 24 + 7),
        (["/model.0/conv/Conv"], 1),
        (["decode", "input-conv"], 25),
        (["stride8"], 78),
    ],
)
def test_resolve_keep(graph: onnx.GraphProto, keep: list[str], count: int) -> None:
    names = resolve_keep(graph, keep)
    assert len(names) == count
    order = [n.name for n in graph.node]
    assert list(names) == sorted(names, key=order.index)


def test_input_conv_is_the_first_conv(graph: onnx.GraphProto) -> None:
    assert resolve_keep(graph, ["input-conv"]) == ("/model.0/conv/Conv",)


def test_unknown_keep_spec_is_named(graph: onnx.GraphProto) -> None:
    with pytest.raises(KeepError, match=r"--keep '/model\.99/' matches no node"):
        resolve_keep(graph, ["/model.99/"])


def test_graph_without_ultralytics_names(graph: onnx.GraphProto) -> None:
    g = onnx.GraphProto()
    g.CopyFrom(graph)
    for n in g.node:
        n.name = n.name.replace("/model.", "/net.")
    with pytest.raises(KeepError, match="cannot find the detection head"):
        find_head(g)


def test_stride8_is_the_high_resolution_part(graph: onnx.GraphProto) -> None:
    st = strides(graph)
    assert st["/model.0/conv/Conv_output_0"] == 2 and st["/model.4/cv2/act/Mul_output_0"] == 8
    assert st["/model.13/Resize_output_0"] == 8 and st["/model.21/cv2/act/Mul_output_0"] == 32
    kept = resolve_keep(graph, ["stride8"])
    blocks = {n.split("/")[1] for n in kept}
    assert blocks == {"model.0", "model.1", "model.2", "model.3", "model.4", "model.13", "model.14", "model.15",
                      "model.22"}
    assert {n for n in kept if n.startswith("/model.22/") and n.endswith("/Conv")} == {
        f"/model.22/{b}.0/{b}.0.{i}/conv/Conv" for b in ("cv2", "cv3") for i in range(2)} | {
        "/model.22/cv2.0/cv2.0.2/Conv", "/model.22/cv3.0/cv3.0.2/Conv"}
