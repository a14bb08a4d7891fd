"""Load an Ultralytics YOLO ONNX export: check its shapes, find its output layout and class names, and make a
fixed batch-1 export batchable (verified with onnxruntime before it is used)."""

from __future__ import annotations

import ast
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

Layout = Literal["anchors_last", "anchors_first", "end2end"]
BATCH_DIM = "batch"
VERIFY_TOLERANCE = 1e-4
_END2END_MAX_ROWS = 1000  # end2end exports keep at most a few hundred boxes; anchor outputs have thousands


class ModelError(Exception):
    """The file is not a usable YOLO detection ONNX model; the message names the file and the shapes."""


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A checked model, ready for an engine. ``onnx_bytes`` is the (possibly made-batchable) graph to run."""

    path: Path
    sha256: str
    onnx_bytes: bytes = field(repr=False)
    input_name: str
    output_name: str
    input_hw: tuple[int, int]
    layout: Layout
    num_classes: int
    class_names: tuple[str, ...]
    batch_dynamic: bool  # the file's batch dimension is symbolic already
    made_batchable: bool  # we rewrote a fixed batch-1 graph and verified it

    @property
    def batchable(self) -> bool:
        return self.batch_dynamic or self.made_batchable


def load_model(path: Path | str, class_names: Sequence[str] | None = None) -> LoadedModel:
    """Read and check an ONNX detection model. ``class_names`` (from config) wins over the model's metadata."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path}: not a file")
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
    except Exception as exc:
        raise ModelError(f"model {path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc
    graph = proto.graph
    meta = {p.key: p.value for p in proto.metadata_props}
    input_name, batch, input_hw = _check_input(path, graph, meta)
    output_name, out_dims = _check_output(path, graph)
    names_meta = _metadata_names(path, meta)
    layout, num_classes = _layout(path, out_dims, names_meta)
    names = _class_names(path, num_classes, class_names, names_meta)
    onnx_bytes, made = data, False
    if batch == 1:
        made = _make_batchable_verified(path, proto, input_name, input_hw)
        if made:
            onnx_bytes = proto.SerializeToString()
    elif batch is not None:
        raise ModelError(f"model {path}: fixed batch {batch} is not supported (export with batch 1 or dynamic)")
    model = LoadedModel(
        path=path, sha256=hashlib.sha256(data).hexdigest(), onnx_bytes=onnx_bytes, input_name=input_name,
        output_name=output_name, input_hw=input_hw, layout=layout, num_classes=num_classes, class_names=names,
        batch_dynamic=batch is None, made_batchable=made,
    )
    log.info("model %s: input %s %s, output %s %s (%s, %d classes), batch %s", path.name, input_name, input_hw,
             output_name, out_dims, layout, num_classes,
             "dynamic" if model.batch_dynamic else "made dynamic" if made else "fixed 1 (engine loops)")
    return model


def _dims(value_info: Any) -> list[int | None]:
    """Static dims of a graph input/output; None for symbolic or unknown ones."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def _check_input(path: Path, graph: Any, meta: Mapping[str, str]) -> tuple[str, int | None, tuple[int, int]]:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"model {path}: expected exactly 1 input, found {len(inputs)}: {[i.name for i in inputs]}")
    inp = inputs[0]
    dims = _dims(inp)
    if inp.type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
        raise ModelError(f"model {path}: input {inp.name!r} must be float32 (elem_type 1), "
                         f"got elem_type {inp.type.tensor_type.elem_type}")
    if len(dims) != 4 or dims[1] != 3:
        raise ModelError(f"model {path}: input {inp.name!r} must be [B,3,H,W], got {_show(dims)}")
    h, w = dims[2], dims[3]
    if h is None or w is None:
        h, w = _imgsz(path, meta, dims)
    return inp.name, dims[0], (h, w)


def _imgsz(path: Path, meta: Mapping[str, str], dims: list[int | None]) -> tuple[int, int]:
    """Input size of a dynamic-size export from its ``imgsz`` metadata ("[640, 640]")."""
    try:
        value = ast.literal_eval(meta.get("imgsz", ""))
        h, w = (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))
    except (ValueError, SyntaxError, TypeError, IndexError):
        raise ModelError(f"model {path}: input {_show(dims)} has a symbolic height/width and no usable "
                         f"'imgsz' metadata ({meta.get('imgsz')!r})") from None
    return h, w


def _check_output(path: Path, graph: Any) -> tuple[str, list[int | None]]:
    outputs = list(graph.output)
    if len(outputs) != 1:
        raise ModelError(f"model {path}: expected 1 output (a detection model), found {len(outputs)}: "
                         f"{[(o.name, _show(_dims(o))) for o in outputs]}")
    dims = _dims(outputs[0])
    if len(dims) != 3:
        raise ModelError(f"model {path}: output {outputs[0].name!r} must be 3-D [B,...], got {_show(dims)}")
    return outputs[0].name, dims


def _layout(path: Path, dims: list[int | None], names: tuple[str, ...] | None) -> tuple[Layout, int]:
    """Tell [B,4+C,N] (anchors_last), [B,N,5+C] (anchors_first) and [B,N,6] (end2end) apart."""
    a, b = dims[1], dims[2]  # either may be symbolic (None), e.g. ['batch', 84, 'anchors'] in dynamic exports
    if b == 6 and (a is None or a <= _END2END_MAX_ROWS or (names is not None and len(names) != 1)):
        return "end2end", len(names) if names is not None else 0
    if names is not None and a == 4 + len(names) and b != 5 + len(names):
        return "anchors_last", len(names)
    if names is not None and b == 5 + len(names) and a != 4 + len(names):
        return "anchors_first", len(names)
    if a is not None and a > 4 and (b is None or a < b):
        return "anchors_last", a - 4
    if b is not None and b > 5 and (a is None or a > b):
        return "anchors_first", b - 5
    raise ModelError(f"model {path}: unknown output layout {_show(dims)}; expected [B,4+C,N] (YOLOv8/11), "
                     f"[B,N,5+C] (YOLOv5) or [B,N,6] (end-to-end)")


def _metadata_names(path: Path, meta: Mapping[str, str]) -> tuple[str, ...] | None:
    """Class names from Ultralytics' ``names`` metadata, a Python dict literal (parsed safely, never eval'd)."""
    raw = meta.get("names")
    if raw is None:
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError) as exc:
        log.warning("model %s: ignoring unparsable 'names' metadata (%s)", path.name, exc)
        return None
    if isinstance(value, dict) and all(isinstance(k, int) for k in value):
        if sorted(value) != list(range(len(value))):
            log.warning("model %s: ignoring 'names' metadata with non-contiguous ids", path.name)
            return None
        return tuple(str(value[i]) for i in range(len(value)))
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    log.warning("model %s: ignoring 'names' metadata of type %s", path.name, type(value).__name__)
    return None


def _class_names(
    path: Path, num_classes: int, configured: Sequence[str] | None, from_meta: tuple[str, ...] | None
) -> tuple[str, ...]:
    names = tuple(configured) if configured is not None else from_meta
    if names is None:
        return tuple(f"class{i}" for i in range(num_classes))
    source = "configured class_names" if configured is not None else "metadata 'names'"
    if num_classes and len(names) != num_classes:
        raise ModelError(f"model {path}: output has {num_classes} classes but {source} has {len(names)}")
    return names


def _show(dims: list[int | None]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


# -- batch-1 -> batchable ------------------------------------------------------------------------------------
def make_batchable(proto: Any, input_name: str) -> int:
    """Rewrite a fixed batch-1 graph in place: I/O dim 0 -> symbolic ``batch``, and Reshape target shapes that
    start with 1 -> 0 ("copy from input"). Returns the number of Reshape shapes changed."""
    from onnx import numpy_helper

    graph = proto.graph
    for vi in [*[i for i in graph.input if i.name == input_name], *graph.output]:
        vi.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    del graph.value_info[:]  # intermediate shapes were inferred for batch 1; onnxruntime infers them again
    initializers = {i.name: i for i in graph.initializer}
    constants = _constant_tensors(graph)
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        tensor = initializers.get(node.input[1], constants.get(node.input[1]))
        if tensor is None or any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            continue
        shape = numpy_helper.to_array(tensor)
        if shape.ndim != 1 or shape.size < 2 or shape[0] != 1:
            continue
        new = shape.copy()
        new[0] = 0
        name = f"{node.input[1]}__batch0"
        if name not in initializers:  # a fresh constant: the original may feed other nodes too
            initializers[name] = numpy_helper.from_array(new, name)
            graph.initializer.append(initializers[name])
        node.input[1] = name
        changed += 1
    return changed


def _constant_tensors(graph: Any) -> dict[str, Any]:
    """Output name -> TensorProto of the graph's ``Constant`` nodes that hold a ``value`` tensor."""
    found: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found


def _make_batchable_verified(path: Path, proto: Any, input_name: str, input_hw: tuple[int, int]) -> bool:
    """Make ``proto`` batchable and check batch-2 output == two batch-1 runs; on failure restore nothing and
    return False (the caller then keeps the original bytes)."""
    from daemon.inference.onnxrt import make_session

    changed = make_batchable(proto, input_name)
    h, w = input_hw
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, h, w), dtype=np.float32)
    try:
        sess = make_session(proto.SerializeToString())
        out_name = sess.get_outputs()[0].name
        single = np.concatenate([sess.run([out_name], {input_name: x[i : i + 1]})[0] for i in range(2)])
        double = sess.run([out_name], {input_name: x})[0]
    except Exception as exc:
        log.warning("model %s: fixed batch 1 and could not be made batchable (%s: %s); the engine will run "
                    "one image at a time", path.name, type(exc).__name__, exc)
        return False
    diff = float(np.max(np.abs(single - double))) if single.shape == double.shape else float("inf")
    if diff > VERIFY_TOLERANCE:
        log.warning("model %s: batch-2 output differs from two batch-1 runs (max abs diff %s, shapes %s vs %s); "
                    "the engine will run one image at a time", path.name, diff, single.shape, double.shape)
        return False
    log.info("model %s: made batchable (%d Reshape shapes rewritten; batch-2 max abs diff %.2g)",
             path.name, changed, diff)
    return True
