"""`deltayolo fidelity --features`: replay a video through full inference on every frame (the reference),
level-1 crop mode (the live pipeline with delta caching) and ``features`` mode (backbone on changed regions
plus a halo, spliced into the camera's reference maps, head on the whole maps), side by side.

For each mode: fidelity against the every-frame detections (object-weighted mAP50 / mAP50-95 and per class,
:mod:`daemon.fidelity.metrics`), frames an object takes to appear and to disappear, the work saved (convolution
work and pixels, and measured inference time against the full model in the same run). For ``features`` mode
also the feature-delta traffic: every frame's maps go through the codec (closed loop, periodic refresh), a
receiver decodes them, and the head is run on the receiver's maps too (``features+codec``), so the bytes and
the fidelity they buy are measured together. Bytes are compared with moving the full FP32 maps every frame
(and, for the record, full INT8 maps).

Frames: the video's first ``limit`` frames from ``start`` (contiguous: the policy needs consecutive frames); the
policy's clock advances ``1/fps`` per frame, so keyframes do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.config.model import DeltaConfig
from daemon.delta.policy import Decision, Verdict
from daemon.features.codec import DEFAULT_THRESHOLD, FeatureDeltaDecoder, FeatureDeltaEncoder, ValueType, refresh_size
from daemon.features.engine import DEFAULT_HALOS, FeatureDeltaRunner, make_quiet_session
from daemon.features.split import CUT_KINDS, CutKind, SplitModel, relative_difference, split_model
from daemon.fidelity.metrics import DetectionMetrics, evaluate
from daemon.inference.model import LoadedModel
from daemon.types import Detection

log = logging.getLogger(__name__)

CAMERA = "eval"
CONF, IOU = 0.25, 0.7  # the cameras' default thresholds, which the live pipeline (crop mode) uses too
MAX_PIXELS = 40_000_000


@dataclass(frozen=True, slots=True)
class FeatureEvalOptions:
    cut: str | tuple[str, ...] = "local"  # a cut kind or tensor names
    halo: int | tuple[int, ...] = DEFAULT_HALOS  # one value, or one per stride
    threshold: float = DEFAULT_THRESHOLD  # codec: a cell is sent when a channel changed by more than this
    refresh_every: int = 30
    dtype: ValueType = "int8"
    fps: float = 10.0  # the policy's clock per frame
    threads: int = 2
    codec_head: bool = True  # also run the head on the receiver's decoded maps
    crop_mode: bool = True  # also run level-1 crop mode through the live pipeline
    delta: DeltaConfig = field(default_factory=lambda: DeltaConfig(enabled=True))


@dataclass(frozen=True, slots=True)
class ModeFigures:
    """One way of producing detections, scored against full inference on every frame."""

    name: str
    metrics: DetectionMetrics
    decisions: dict[str, int]
    work_fraction: float  # convolution work per frame vs the full model (FULL = 1)
    pixel_fraction: float  # input pixels inferred (crop) or run through the backbone (features) vs full frames
    infer_s: float  # inference seconds, all frames
    time_fraction: float  # infer_s vs the full model's in the same kind of run
    appear_lag_mean: float  # frames until an object's box first appears (reference tracks of >= 5 frames)
    disappear_lag_mean: float  # frames a box stays after the object left


@dataclass(frozen=True, slots=True)
class FeatureBytes:
    messages: int
    refreshes: int
    delta_bytes: int  # all codec messages over the sequence
    full_fp32_bytes: int  # the full maps in FP32, every frame
    full_int8_bytes: int  # a refresh message (full maps, INT8) every frame
    cells_sent_fraction: float

    @property
    def ratio_fp32(self) -> float:
        return self.delta_bytes / self.full_fp32_bytes if self.full_fp32_bytes else float("nan")

    @property
    def ratio_int8(self) -> float:
        return self.delta_bytes / self.full_int8_bytes if self.full_int8_bytes else float("nan")


@dataclass(frozen=True, slots=True)
class FeatureEvalReport:
    model: str
    video: str
    start: int
    frames: int
    cut: str
    taps: tuple[str, ...]
    strides: tuple[int, ...]
    backbone_share: float
    halo: tuple[int, ...]
    threshold: float
    refresh_every: int
    dtype: str
    split_max_rel_diff: float  # head(backbone(x)) vs the model, on the FULL frames
    modes: tuple[ModeFigures, ...]
    bytes: FeatureBytes
    seconds: float

    def mode(self, name: str) -> ModeFigures:
        for m in self.modes:
            if m.name == name:
                return m
        raise KeyError(f"no mode {name!r} in the report (have {[m.name for m in self.modes]})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modes"] = [{**dataclasses.asdict(m), "metrics": m.metrics.to_dict()} for m in self.modes]
        d["bytes"]["ratio_fp32"] = self.bytes.ratio_fp32
        d["bytes"]["ratio_int8"] = self.bytes.ratio_int8
        return d

    def write_json(self, path: Path | str) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    def summary(self) -> str:
        b = self.bytes
        lines = [
            f"features vs crop vs full: {Path(self.model).name} on {Path(self.video).name} frames "
            f"{self.start}..{self.start + self.frames - 1} ({self.frames}), {self.cut} cut at strides "
            f"{list(self.strides)} (backbone {self.backbone_share:.0%} of the work), halo {list(self.halo)} px",
            f"  split: max relative difference {self.split_max_rel_diff:.2e} on full frames",
            f"  {'mode':<16}{'mAP50w':>8}{'mAP50-95w':>10}{'work':>7}{'pixels':>8}{'time':>7}{'appear':>8}"
            f"{'vanish':>8}  decisions / per-class AP50",
        ]
        for m in self.modes:
            classes = " ".join(f"{c.name}:{c.ap50:.3f}" for c in m.metrics.major())
            lines.append(
                f"  {m.name:<16}{m.metrics.map50_weighted:8.4f}{m.metrics.map50_95_weighted:10.4f}"
                f"{m.work_fraction:7.1%}{m.pixel_fraction:8.1%}{m.time_fraction:7.1%}{m.appear_lag_mean:8.2f}"
                f"{m.disappear_lag_mean:8.2f}  {dict(m.decisions)} {classes}")
        lines.append(
            f"  feature deltas ({self.dtype}, threshold {self.threshold}, refresh every {self.refresh_every}): "
            f"{b.delta_bytes / 1e6:.2f} MB in {b.messages} messages ({b.refreshes} refreshes), "
            f"{b.ratio_fp32:.1%} of full FP32 maps ({b.full_fp32_bytes / 1e6:.1f} MB), {b.ratio_int8:.1%} of full "
            f"INT8 maps; {b.cells_sent_fraction:.1%} of cells sent")
        lines.append("  work/pixels/time: share of full inference on every frame (lower saves more); time of full, "
                     "features, features+codec (the receiver's head alone) against the full model in one loop, of "
                     "crop against full-live (the live pipeline, batches of 4); appear/vanish: mean frames, "
                     "compare with the full row (track linking itself)")
        return "\n".join(lines)


@dataclass(slots=True)
class _Mode:
    name: str
    dets: list[tuple[Detection, ...]] = field(default_factory=list)
    decisions: Counter[str] = field(default_factory=Counter)
    work: list[float] = field(default_factory=list)
    pixels: list[float] = field(default_factory=list)
    seconds: float = 0.0


def rows(dets: Sequence[Detection]) -> NDArray[np.float32]:
    """Detections -> (N, 6) x1, y1, x2, y2, score, class rows (what the metrics take)."""
    return np.array([(d.x1, d.y1, d.x2, d.y2, d.score, d.class_id) for d in dets], np.float32).reshape(-1, 6)


class _FeatureLoop:
    """Per frame: the full model (reference), then ``features`` mode, then the codec and the receiver's head."""

    def __init__(self, model: LoadedModel, split: SplitModel, opts: FeatureEvalOptions) -> None:
        from daemon.delta.tracker import DeltaTracker, params_from_config

        params = params_from_config(opts.delta)
        if params is None:
            raise ValueError("features evaluation needs delta caching enabled in its DeltaConfig")
        self._model = model
        self._opts = opts
        self._full = make_quiet_session(model.onnx_bytes, opts.threads)  # same session settings as the halves
        self.runner = FeatureDeltaRunner(split, opts.halo, opts.threads)
        self._tracker = DeltaTracker()
        self._tracker.configure(CAMERA, params)
        self.encoder = FeatureDeltaEncoder(opts.threshold, self.runner.strides, opts.refresh_every, opts.dtype)
        self._decoder = FeatureDeltaDecoder()
        self.reference, self.features, self.codec = _Mode("full"), _Mode("features"), _Mode("features+codec")
        self.max_rel = 0.0
        self._maps: list[Any] | None = None
        self._x = np.zeros((1, 3, *model.input_hw), np.float32)

    def step(self, i: int, jpeg: bytes) -> None:
        from daemon.decode.jpeg import decode_jpeg
        from daemon.decode.letterbox import letterbox_into
        from daemon.delta.signature import luma_signature

        image = decode_jpeg(jpeg, MAX_PIXELS)
        lb = letterbox_into(image, self._model.input_hw, self._x[0])
        t0 = time.perf_counter()
        raw_full = self._full.run([self._model.output_name], {self._model.input_name: self._x})[0]
        self.reference.seconds += time.perf_counter() - t0
        self.reference.dets.append(self._boxes(raw_full, lb))
        self.reference.work.append(1.0)
        self.reference.pixels.append(1.0)
        self.reference.decisions["full"] += 1
        now = i / self._opts.fps
        verdict = self._tracker.plan(CAMERA, luma_signature(image, lb, self._model.input_hw[0]), lb, now)
        raw = self._features(verdict)
        if verdict.decision is Decision.FULL and raw is not None:
            self.max_rel = max(self.max_rel, relative_difference(raw, raw_full))
        fresh = () if raw is None else self._boxes(raw, lb)
        whole = Verdict(Decision.FULL, verdict.reason) if verdict.decision is Decision.REGIONS else verdict
        self.features.dets.append(self._tracker.resolve(CAMERA, whole, fresh, lb, now)[0])
        self.features.decisions[verdict.decision.value] += 1
        self._codec_step(verdict, lb)

    def _features(self, verdict: Verdict) -> NDArray[np.float32] | None:
        t0 = time.perf_counter()
        raw: NDArray[np.float32] | None = None
        work = pixels = 0.0
        if verdict.decision is Decision.FULL or self._maps is None:
            raw, maps = self.runner.full(self._x)
            self._maps = maps[0]
            work = pixels = 1.0
        elif verdict.decision is Decision.REGIONS:
            res = self.runner.regions(self._x[0], self._maps, verdict.regions)
            raw = res.raw
            work = self.runner.work_fraction(res.crop_pixels)
            pixels = min(1.0, res.crop_pixels / float(np.prod(self._model.input_hw)))
        self.features.seconds += time.perf_counter() - t0
        self.features.work.append(work)
        self.features.pixels.append(pixels)
        return raw

    def _codec_step(self, verdict: Verdict, lb: Any) -> None:
        if self._maps is None:
            return
        received = self._decoder.apply(self.encoder.encode(self._maps))
        if not self._opts.codec_head:
            return
        c = self.codec
        c.decisions[verdict.decision.value] += 1
        c.work.append(self.features.work[-1])
        c.pixels.append(self.features.pixels[-1])
        if verdict.decision is Decision.SKIP and c.dets:
            c.dets.append(c.dets[-1])
            return
        t0 = time.perf_counter()
        raw = self.runner.head([m[None] for m in received])
        c.seconds += time.perf_counter() - t0
        c.dets.append(self._boxes(raw, lb))

    def _boxes(self, raw: NDArray[np.float32], lb: Any) -> tuple[Detection, ...]:
        from daemon.inference.yolo import decode_output, to_detections

        m = self._model
        return to_detections(decode_output(raw, m.layout, CONF, IOU)[0], lb, m.class_names)


def _live_modes(model: LoadedModel, frames: Sequence[bytes], opts: FeatureEvalOptions) -> tuple[_Mode, _Mode]:
    """Full inference and level-1 crop mode through the live CPU pipeline (batches of 4, canvases)."""
    from daemon.backend import build_engine
    from daemon.config.model import ModelConfig
    from daemon.delta.evaluate import RunRecord, replay_once

    choice = build_engine(ModelConfig(path=str(model.path), backend="onnxruntime", threads=opts.threads), 4)
    out = []
    for name, delta in (("full-live", DeltaConfig(enabled=False)), ("crop", opts.delta)):
        rec: RunRecord = replay_once(choice, frames, delta)
        seqs = sorted(rec.detections)
        if len(seqs) != len(frames):
            raise RuntimeError(f"{name}: the live pipeline published {len(seqs)} of {len(frames)} frames")
        mode = _Mode(name, [rec.detections[s] for s in seqs], Counter(rec.decisions[s] for s in seqs),
                     [rec.inferred[s] for s in seqs], [rec.inferred[s] for s in seqs], rec.infer_s)
        out.append(mode)
        log.info("features evaluation: %s through the live pipeline in %.0f s", name, rec.wall_s)
    close = getattr(choice.engine, "close", None)
    if callable(close):
        close()
    return out[0], out[1]


def _figures(mode: _Mode, reference: list[tuple[Detection, ...]], names: Sequence[str],
             baseline_s: float) -> ModeFigures:
    from daemon.delta.evaluate import track_lags

    metrics = evaluate([rows(d) for d in reference], [rows(d) for d in mode.dets], names)
    lags = track_lags(dict(enumerate(reference)), dict(enumerate(mode.dets)))
    return ModeFigures(
        name=mode.name, metrics=metrics, decisions=dict(mode.decisions),
        work_fraction=float(np.mean(mode.work)) if mode.work else 0.0,
        pixel_fraction=float(np.mean(mode.pixels)) if mode.pixels else 0.0,
        infer_s=mode.seconds, time_fraction=mode.seconds / baseline_s if baseline_s else float("nan"),
        appear_lag_mean=float(np.mean(lags.appear_frames)) if lags.appear_frames else 0.0,
        disappear_lag_mean=float(np.mean(lags.disappear_frames)) if lags.disappear_frames else 0.0,
    )


def evaluate_features(model: Path | str, video: Path | str, *, start: int = 0, limit: int | None = None,
                      options: FeatureEvalOptions | None = None) -> FeatureEvalReport:
    """Replay ``video`` through full inference, crop mode and features mode; see the module doc."""
    from daemon.inference.model import load_model
    from daemon.sources.replay import load_jpeg_frames

    opts = options or FeatureEvalOptions()
    t_start = time.monotonic()
    loaded = load_model(model)
    split = split_model(loaded, cut_argument(opts.cut))
    frames = load_jpeg_frames(video, limit=None if limit is None else start + limit)[start:]
    if not frames:
        raise ValueError(f"video {video}: no frames from {start} (limit {limit})")
    loop = _FeatureLoop(loaded, split, opts)
    for i, jpeg in enumerate(frames):
        loop.step(i, jpeg)
        if (i + 1) % 100 == 0:
            log.info("features evaluation: %d/%d frames", i + 1, len(frames))
    ref = loop.reference.dets
    names = loaded.class_names
    modes = [_figures(m, ref, names, loop.reference.seconds) for m in (loop.reference, loop.features)]
    if opts.codec_head:
        modes.append(_figures(loop.codec, ref, names, loop.reference.seconds))
    if opts.crop_mode:
        live_full, crop = _live_modes(loaded, frames, opts)
        modes += [_figures(m, ref, names, live_full.seconds) for m in (live_full, crop)]
    return FeatureEvalReport(
        model=str(model), video=str(video), start=start, frames=len(frames), cut=split.kind,
        taps=tuple(t.name for t in split.taps), strides=loop.runner.strides, backbone_share=split.backbone_share,
        halo=loop.runner.halos, threshold=opts.threshold, refresh_every=opts.refresh_every, dtype=opts.dtype,
        split_max_rel_diff=loop.max_rel, modes=tuple(modes), bytes=_bytes(loop, split, len(frames)),
        seconds=time.monotonic() - t_start,
    )


def cut_argument(cut: str | Sequence[str]) -> CutKind | list[str]:
    """A cut kind, or tensor names (a comma-separated string or a sequence)."""
    if isinstance(cut, str):
        for kind in CUT_KINDS:
            if cut == kind:
                return kind
        return [c.strip() for c in cut.split(",") if c.strip()]
    return list(cut)


def _bytes(loop: _FeatureLoop, split: SplitModel, frames: int) -> FeatureBytes:
    st = loop.encoder.stats
    shapes = [(t.channels, t.height, t.width) for t in split.taps]
    return FeatureBytes(
        messages=st.messages, refreshes=st.refreshes, delta_bytes=st.bytes,
        full_fp32_bytes=frames * split.feature_bytes_fp32, full_int8_bytes=frames * refresh_size(shapes),
        cells_sent_fraction=st.cells_sent / st.cells_total if st.cells_total else 0.0,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `deltayolo fidelity --features`."""
    parser.add_argument("--model", default="builtin:yolov8n", help="ONNX model (default builtin:yolov8n)")
    parser.add_argument("--video", default="builtin:vtest", help="video to replay (default builtin:vtest)")
    parser.add_argument("--start", type=int, default=0, help="first frame (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="frames from --start (default: all)")
    parser.add_argument("--cut", default="local",
                        help=f"split point: {' | '.join(CUT_KINDS)} or comma-separated tensor names (default local)")
    parser.add_argument("--halo", type=int, nargs="+", default=list(DEFAULT_HALOS),
                        help=f"context pixels around a region, one value or one per stride (default "
                             f"{' '.join(map(str, DEFAULT_HALOS))})")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"codec: send a cell when a channel changed by more than this (default "
                             f"{DEFAULT_THRESHOLD})")
    parser.add_argument("--refresh-every", type=int, default=30, help="codec: full refresh every N messages")
    parser.add_argument("--dtype", choices=("int8", "float16"), default="int8", help="codec value type")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (default 2)")
    parser.add_argument("--no-crop-mode", action="store_true", help="skip the live-pipeline crop-mode runs")
    parser.add_argument("--no-codec-head", action="store_true", help="skip the head on the receiver's maps")
    parser.add_argument("--json", type=Path, help="write the report here as JSON")
    parser.add_argument("--require-map50", type=float, help="exit 1 if features mode's weighted mAP50 is lower")
    parser.add_argument("--require-bytes-ratio", type=float,
                        help="exit 1 if feature-delta bytes exceed this share of full FP32 maps")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation from parsed ``add_arguments`` options; 0 ok, 1 a requirement failed, 2 error."""
    import sys

    from daemon.cameras import resolve_builtin
    from daemon.features.split import SplitError
    from daemon.inference.model import ModelError

    halo = tuple(args.halo)
    opts = FeatureEvalOptions(cut=args.cut, halo=halo if len(halo) > 1 else halo[0],
                              threshold=args.threshold, refresh_every=args.refresh_every, dtype=args.dtype,
                              threads=args.threads, codec_head=not args.no_codec_head,
                              crop_mode=not args.no_crop_mode)
    try:
        report = evaluate_features(resolve_builtin(args.model), resolve_builtin(args.video), start=args.start,
                                   limit=args.limit, options=opts)
    except (SplitError, ModelError, ValueError, OSError) as exc:
        print(f"fidelity --features: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json:
        print(f"  wrote {report.write_json(args.json)}")
    failed = []
    feat = report.mode("features")
    if args.require_map50 is not None and not feat.metrics.map50_weighted >= args.require_map50:
        failed.append(f"features mAP50 {feat.metrics.map50_weighted:.4f} < {args.require_map50}")
    if args.require_bytes_ratio is not None and not report.bytes.ratio_fp32 <= args.require_bytes_ratio:
        failed.append(f"feature-delta bytes {report.bytes.ratio_fp32:.3f} of full maps > {args.require_bytes_ratio}")
    for f in failed:
        print(f"fidelity --features: {f}", file=sys.stderr)
    return 1 if failed else 0
