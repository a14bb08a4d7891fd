"""Split an Ultralytics YOLOv5/8/11 ONNX export into a backbone and a head that together equal the model.

Where to cut (``cut``):

- ``"local"`` (default): the tensors that enter the first layer with a non-local operator (SPPF's max pools,
  an upsample, attention) from the layers before it. For YOLOv5/8/11 these are the outputs of layers 4, 6 and 8
  (strides 8, 16, 32): plain convolution stacks whose cells depend only on a bounded neighbourhood of input
  pixels, so a crop of the changed region plus a halo reproduces them. SPPF (a 13x13-cell max-pool cascade at
  stride 32), the FPN/PAN neck and the Detect head run on the whole spliced maps, so a change still reaches
  every cell it influences through them.
- ``"backbone"``: the tensors entering the neck (the first upsample layer): layers 4, 6, 9 for YOLOv8. The
  stride-32 tensor has passed SPPF already, so a moving object changes cells up to ~200 px away that a crop
  cannot reproduce.
- ``"neck"``: the inputs of the Detect head (layers 15, 18, 21 for YOLOv8): after the FPN/PAN neck every cell
  depends on the whole image through the top-down path; least locality, most compute saved.
- a list of tensor names: an explicit cut (config override) for exports whose layers are named differently.

The backbone takes ``[batch, 3, height, width]`` with symbolic height and width (any multiple of the largest
stride), so crops can be run; the head takes the cut tensors at the model's full input size and returns the
model's output unchanged (same name, layout and batch handling), so box decoding works as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from daemon.inference.model import BATCH_DIM, LoadedModel

log = logging.getLogger(__name__)

CutKind = Literal["local", "backbone", "neck"]
CUT_KINDS: tuple[CutKind, ...] = ("local", "backbone", "neck")
NONLOCAL_OPS = frozenset({"MaxPool", "Resize", "Upsample", "MatMul", "Softmax", "GlobalAveragePool",
                          "GlobalMaxPool", "ReduceMean", "ReduceMax", "Einsum"})
UPSAMPLE_OPS = frozenset({"Resize", "Upsample"})
_LAYER = re.compile(r"/model\.(\d+)/")


class SplitError(Exception):
    """The model cannot be split as asked; the message names the model and the tensors."""


@dataclass(frozen=True, slots=True)
class FeatureTap:
    """One cut tensor: its name and its shape at the model's full input (batch left out)."""

    name: str
    stride: int
    channels: int
    height: int
    width: int

    @property
    def cells(self) -> int:
        return self.height * self.width

    @property
    def elements(self) -> int:
        return self.channels * self.height * self.width


@dataclass(frozen=True, slots=True)
class SplitModel:
    """The two halves of a model. ``backbone_bytes``: images -> taps; ``head_bytes``: taps -> output."""

    model: LoadedModel
    kind: str  # "local" | "backbone" | "neck" | "config"
    taps: tuple[FeatureTap, ...]  # by stride, finest first
    backbone_bytes: bytes = field(repr=False)
    head_bytes: bytes = field(repr=False)
    backbone_macs: int  # multiply-accumulates of the convolutions at the full input, per image
    head_macs: int

    @property
    def max_stride(self) -> int:
        return max(t.stride for t in self.taps)

    @property
    def feature_bytes_fp32(self) -> int:
        """Bytes of one image's full feature maps in FP32."""
        return 4 * sum(t.elements for t in self.taps)

    @property
    def backbone_share(self) -> float:
        """The backbone's part of the model's convolution work."""
        total = self.backbone_macs + self.head_macs
        return self.backbone_macs / total if total else 0.0


def layer_of(name: str) -> int | None:
    """The Ultralytics layer index in a node or tensor name (``/model.22/cv2.0/...`` -> 22), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def _node_layers(graph: Any) -> list[int]:
    """Layer index per node (in graph order); unnamed nodes inherit the largest layer of their producers."""
    layer_of_tensor: dict[str, int] = {}
    out: list[int] = []
    for node in graph.node:
        found = layer_of(node.name)
        if found is None:
            found = next((v for v in (layer_of(o) for o in node.output) if v is not None), None)
        if found is None:
            found = max((layer_of_tensor.get(i, -1) for i in node.input if i), default=-1)
        out.append(found)
        for o in node.output:
            layer_of_tensor[o] = found
    return out


def find_cut(proto: Any, kind: CutKind) -> list[str]:
    """The cut tensor names of ``kind`` (see the module doc) in a loaded ONNX ``ModelProto``."""
    graph = proto.graph
    layers = _node_layers(graph)
    named = [(n, k) for n, k in zip(graph.node, layers, strict=True) if k >= 0]
    if not named:
        raise SplitError("no node names of the form /model.N/...: not an Ultralytics export; give the cut tensor "
                         "names explicitly")
    if kind == "neck":
        start = max(k for _, k in named)
    else:
        ops = NONLOCAL_OPS if kind == "local" else UPSAMPLE_OPS
        hits = [k for n, k in named if n.op_type in ops]
        if not hits:
            raise SplitError(f"no layer with {sorted(ops)} operators: cannot find the {kind!r} cut automatically")
        start = min(hits)
    produced_before: dict[str, int] = {}
    for node, k in zip(graph.node, layers, strict=True):
        if 0 <= k < start and node.op_type != "Constant":
            for o in node.output:
                produced_before[o] = k
    cut: list[str] = []
    for node, k in zip(graph.node, layers, strict=True):
        if k >= start:
            cut.extend(i for i in node.input if i in produced_before and i not in cut)
    if not cut:
        raise SplitError(f"the {kind!r} cut at layer {start} consumes no tensor of earlier layers")
    return cut


def _producers(graph: Any) -> dict[str, int]:
    return {o: i for i, node in enumerate(graph.node) for o in node.output}


def _subgraph_nodes(graph: Any, inputs: Iterable[str], outputs: Iterable[str]) -> list[Any]:
    """Nodes needed to compute ``outputs`` from ``inputs`` (plus initializers), in graph order."""
    producer = _producers(graph)
    stop = set(inputs)
    keep: set[int] = set()
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in stop or t in seen:
            continue
        seen.add(t)
        idx = producer.get(t)
        if idx is None or idx in keep:
            continue
        keep.add(idx)
        stack.extend(i for i in graph.node[idx].input if i)
    return [n for i, n in enumerate(graph.node) if i in keep]


def _free_inputs(nodes: Sequence[Any], initializers: set[str]) -> set[str]:
    """Tensors the nodes read that none of them produces and that are not initializers."""
    produced = {o for n in nodes for o in n.output}
    return {i for n in nodes for i in n.input if i and i not in produced and i not in initializers}


def _tensor_info(name: str, dims: Sequence[int | str]) -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _sub_model(proto: Any, nodes: list[Any], inputs: list[Any], outputs: list[Any], name: str) -> bytes:
    from onnx import helper

    used = {i for n in nodes for i in n.input}
    inits = [i for i in proto.graph.initializer if i.name in used]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    sub = helper.make_model(graph, opset_imports=list(proto.opset_import), producer_name="deltayolo.features")
    sub.ir_version = proto.ir_version
    data: bytes = sub.SerializeToString()
    return data


def _shapes(proto: Any) -> dict[str, list[int | None]]:
    """Tensor name -> inferred dims (None for symbolic) of every value in the graph."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    out: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return out


def _product(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def conv_macs(proto: Any, nodes: Iterable[Any], shapes: dict[str, list[int | None]]) -> int:
    """Multiply-accumulates of the Conv nodes among ``nodes`` for one image."""
    weights = {i.name: list(i.dims) for i in proto.graph.initializer}
    total = 0
    for n in nodes:
        if n.op_type != "Conv" or len(n.input) < 2 or n.input[1] not in weights:
            continue
        out = shapes.get(n.output[0])
        if out is None or len(out) != 4 or any(d is None for d in out[1:]):
            continue
        w = weights[n.input[1]]
        total += _product(d or 0 for d in out[1:]) * _product(w[1:])
    return total


def split_model(model: LoadedModel, cut: CutKind | Sequence[str] = "local") -> SplitModel:
    """Split ``model`` at ``cut`` (a kind, or tensor names) into a batchable backbone and head."""
    import onnx

    proto = onnx.load_from_string(model.onnx_bytes)
    graph = proto.graph
    kind = cut if isinstance(cut, str) else "config"
    if isinstance(cut, str):
        if cut not in CUT_KINDS:
            raise SplitError(f"model {model.path.name}: unknown cut {cut!r}; expected one of {CUT_KINDS} or a "
                             f"list of tensor names")
        names = find_cut(proto, cut)
    else:
        names = list(cut)
    shapes = _shapes(proto)
    taps = _taps(model, names, shapes)
    initializers = {i.name for i in graph.initializer}
    tap_names = [t.name for t in taps]
    back_nodes = _subgraph_nodes(graph, [model.input_name], tap_names)
    head_nodes = _subgraph_nodes(graph, tap_names, [model.output_name])
    if model.input_name in _free_inputs(head_nodes, initializers):
        raise SplitError(f"model {model.path.name}: the cut {tap_names} does not separate the input from the "
                         f"output (the head still reads {model.input_name!r})")
    back_in = _tensor_info(model.input_name, [BATCH_DIM, 3, "height", "width"])
    back_out = [_tensor_info(t.name, [BATCH_DIM, t.channels, f"h{t.stride}", f"w{t.stride}"]) for t in taps]
    head_in = [_tensor_info(t.name, [BATCH_DIM, t.channels, t.height, t.width]) for t in taps]
    out_dims = shapes.get(model.output_name, [])
    head_out = _tensor_info(model.output_name, [BATCH_DIM, *[d if d is not None else "n" for d in out_dims[1:]]])
    split = SplitModel(
        model=model, kind=kind, taps=taps,
        backbone_bytes=_sub_model(proto, back_nodes, [back_in], back_out, "backbone"),
        head_bytes=_sub_model(proto, head_nodes, head_in, [head_out], "head"),
        backbone_macs=conv_macs(proto, back_nodes, shapes), head_macs=conv_macs(proto, head_nodes, shapes),
    )
    log.info("model %s: %s cut at %s (strides %s, %.0f%% of the convolution work in the backbone, %.2f MB of "
             "FP32 features per image)", model.path.name, kind, tap_names, [t.stride for t in taps],
             100 * split.backbone_share, split.feature_bytes_fp32 / 1e6)
    return split


def _taps(model: LoadedModel, names: Sequence[str], shapes: dict[str, list[int | None]]) -> tuple[FeatureTap, ...]:
    h, w = model.input_hw
    taps = []
    for name in names:
        dims = shapes.get(name)
        if dims is None:
            raise SplitError(f"model {model.path.name}: cut tensor {name!r} is not in the graph (or its shape "
                             f"cannot be inferred)")
        if len(dims) != 4 or any(d is None or d <= 0 for d in dims[1:]):
            raise SplitError(f"model {model.path.name}: cut tensor {name!r} must be [B,C,H,W] with static C,H,W, "
                             f"got {dims}")
        c, fh, fw = (int(d) for d in dims[1:])  # type: ignore[arg-type]
        if h % fh or w % fw or h // fh != w // fw:
            raise SplitError(f"model {model.path.name}: cut tensor {name!r} of {fh}x{fw} cells is not a whole "
                             f"stride of the {h}x{w} input")
        taps.append(FeatureTap(name, h // fh, c, fh, fw))
    return tuple(sorted(taps, key=lambda t: (t.stride, t.name)))


def relative_difference(candidate: NDArray[np.float32], reference: NDArray[np.float32]) -> float:
    """max |candidate - reference| / max |reference|, per output channel (axis 1), worst channel: box
    coordinates (hundreds of pixels) and class scores (0..1) are each judged on their own scale."""
    a = np.asarray(candidate, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    axes = tuple(i for i in range(b.ndim) if i != 1)
    scale = np.maximum(np.abs(b).max(axis=axes), np.finfo(np.float32).tiny)
    return float((np.abs(a - b).max(axis=axes) / scale).max())
