"""Per-block quantization sensitivity of one class: which convolutions' INT8 error moves that class's scores.

For each block (``/model.N/``, or one head branch ``/model.22/cv3.0/``), a model is quantized with the cached
calibration ranges in one of two modes: ``only`` quantizes that block's convolutions and keeps everything else in
float (the block's own damage); ``without`` is the target's default INT8 model with that block kept in float (what
keeping it buys). Each model runs on the frames where the reference scores the class at ``min_score`` or more
somewhere (the frames that decide its AP), and the class is scored against the reference's detections at ``conf``:
AP50 ranked (candidate boxes down to 0.001), AP50 published (candidate at ``conf``) and the RMS difference of the
class's raw scores over anchors where the reference scores at least 0.05.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from daemon.quant.frames import SourceFrame, iter_prepared

Mode = Literal["only", "without"]
_GROUP = re.compile(r"^(/model\.\d+/cv\d\.\d+/|/model\.\d+/)")


@dataclass(frozen=True, slots=True)
class SensitivityRow:
    group: str
    convs: int
    params: int
    ap50_ranked: float
    ap50_published: float
    score_rms: float


def conv_groups(graph: Any) -> dict[str, list[str]]:
    """Conv node names by block prefix, graph order; the DFL conv (fixed weights) is left out."""
    groups: dict[str, list[str]] = {}
    for n in graph.node:
        if n.op_type != "Conv" or "/dfl/" in n.name:
            continue
        m = _GROUP.match(n.name)
        groups.setdefault(m.group(1) if m else n.name, []).append(n.name)
    return groups


def _run(path: Path, x: NDArray[np.uint8], class_id: int, conf: float, threads: int
         ) -> tuple[list[NDArray[np.float32]], list[NDArray[np.float32]], NDArray[np.float32]]:
    from daemon.inference.model import load_model
    from daemon.inference.onnxrt import OnnxRuntimeEngine
    from daemon.inference.yolo import decode_output

    model = load_model(path)
    engine = OnnxRuntimeEngine(model, 1, threads)
    ranked: list[NDArray[np.float32]] = []
    published: list[NDArray[np.float32]] = []
    raw: list[NDArray[np.float32]] = []
    try:
        for frame in x:
            out = engine.infer((frame.astype(np.float32) / np.float32(255.0))[None])
            raw.append(out[0, 4 + class_id].copy())
            for dest, k in ((ranked, 0.001), (published, conf)):
                rows = decode_output(out, model.layout, k, 0.7)[0]
                dest.append(rows[rows[:, 5] == class_id])
    finally:
        engine.close()
    return ranked, published, np.stack(raw)


def block_sensitivity(
    model_path: Path, ranges: dict[str, tuple[float, float]], method: str, frames: Sequence[SourceFrame],
    class_id: int, *, target: str = "tensorrt", mode: Mode = "only", groups: Sequence[str] | None = None,
    min_score: float = 0.18, conf: float = 0.25, threads: int = 2, log: Any = None,
) -> tuple[int, list[SensitivityRow]]:
    """(frames used, one row per block). ``ranges``: calibrated ranges (a ``--ranges`` cache's ``ranges``)."""
    import onnx

    from daemon.fidelity.metrics import evaluate
    from daemon.inference.model import load_model
    from daemon.quant.calibrate import CalibrationOptions, _quantize, _target_spec
    from daemon.quant.keep import DEFAULT_KEEP, resolve_keep

    proto = onnx.load(str(model_path))
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    all_groups = conv_groups(proto.graph)
    chosen = list(all_groups) if not groups else list(groups)
    nodes = [n.name for n in proto.graph.node]
    default_keep = set(resolve_keep(proto.graph, DEFAULT_KEEP[target]))
    opts = CalibrationOptions()
    spec = _target_spec(target, opts)  # type: ignore[arg-type]
    hw = load_model(model_path).input_hw
    x = np.stack([np.round(p.tensor * 255).astype(np.uint8) for p in iter_prepared(frames, hw)])
    names = load_model(model_path).class_names
    _, ref_pub, ref_raw = _run(model_path, x, class_id, conf, threads)
    use = [i for i, r in enumerate(ref_raw) if float(r.max()) >= min_score]
    x, gt, ref_raw = x[use], [ref_pub[i] for i in use], ref_raw[use]
    top = ref_raw >= 0.05
    rows: list[SensitivityRow] = []
    with tempfile.TemporaryDirectory(prefix="deltayolo-sens-") as tmp:
        out = Path(tmp) / "m.onnx"
        for g in chosen:
            members = set(all_groups[g])
            kept = ([n for n in nodes if n not in members] if mode == "only"
                    else [n for n in nodes if n in default_keep or n in members])
            _quantize(model_path, out, ranges, method, spec, kept, opts)  # type: ignore[arg-type]
            low, pub, raw = _run(out, x, class_id, conf, threads)
            ap = [next(c.ap50 for c in evaluate(gt, d, names, min_objects=1).classes if c.class_id == class_id)
                  for d in (low, pub)]
            rms = float(np.sqrt(np.mean((raw[top] - ref_raw[top]) ** 2))) if top.any() else 0.0
            params = sum(sizes.get(t, 0) for n in proto.graph.node if n.name in members for t in n.input[1:])
            rows.append(SensitivityRow(g, len(members), params, ap[0], ap[1], rms))
            if log is not None:
                log(rows[-1])
    return len(use), rows
