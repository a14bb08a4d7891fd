"""The calibration report: what was quantized, how, from which frames, and what stayed in float."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class TensorRange:
    """One activation's calibrated range (before the quantizer makes it symmetric or adds zero)."""

    tensor: str
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class TrtCheckResult:
    """Outcome of :func:`daemon.quant.trtcheck.check_trt_qdq`: ``ok`` when no error was found."""

    ok: bool
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    counts: dict[str, int]
    cannot_check: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    """Everything ``deltayolo calibrate`` did; written next to the model as ``<out>.calib.json``."""

    model: str
    model_sha256: str
    out_path: str
    method: str
    target: str
    quant_format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    symmetric_activations: bool
    keep: tuple[str, ...]
    kept_nodes: tuple[str, ...]
    frame_sources: tuple[str, ...]
    frame_count: int
    frame_digests: tuple[str, ...]
    method_options: dict[str, float | int | bool | str]
    fp32_bytes: int
    int8_bytes: int
    quantized_ops: dict[str, int]  # op type -> count of nodes with a quantized input (or QLinear ops)
    float_ops: dict[str, int]  # op type -> count of nodes left in float
    qdq_nodes: int
    calibrate_s: float
    quantize_s: float
    onnxruntime_version: str
    created: str
    widest_ranges: tuple[TensorRange, ...] = ()
    trt_check: TrtCheckResult | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size_ratio(self) -> float:
        return self.int8_bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size_ratio"] = round(self.size_ratio, 4)
        return d

    def write_json(self, path: Path | str) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    def summary(self) -> str:
        """A few human lines for the terminal."""
        q = ", ".join(f"{k} {v}" for k, v in sorted(self.quantized_ops.items()))
        lines = [
            f"calibrated {Path(self.model).name} -> {self.out_path}",
            f"  target {self.target} ({self.quant_format}, activations {self.activation_type}"
            f"{' symmetric' if self.symmetric_activations else ''}, weights {self.weight_type}"
            f"{' per-channel' if self.per_channel else ''}), method {self.method} {self.method_options}",
            f"  {self.frame_count} frames from {', '.join(self.frame_sources)}",
            f"  kept in float: {len(self.kept_nodes)} nodes (keep {' '.join(self.keep) or '-'}); quantized: {q}",
            f"  size {self.int8_bytes / 1e6:.2f} MB vs FP32 {self.fp32_bytes / 1e6:.2f} MB "
            f"({self.size_ratio:.3f}x); calibration {self.calibrate_s:.1f} s, quantization {self.quantize_s:.1f} s",
        ]
        if self.trt_check is not None:
            verdict = "passes" if self.trt_check.ok else f"FAILS ({len(self.trt_check.errors)} errors)"
            lines.append(f"  TensorRT structural check {verdict}; {len(self.trt_check.warnings)} warnings")
            lines.extend(f"    error: {e}" for e in self.trt_check.errors[:10])
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)
