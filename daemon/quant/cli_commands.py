"""`deltayolo calibrate` and `deltayolo fidelity`: argument definitions and runners for daemon/cli.py.

Also runnable on its own: ``python3 -m daemon.quant.cli_commands calibrate|fidelity ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.fidelity.compare import RANKING_CONF
from daemon.quant.calibrate import DEFAULT_METHOD, METHODS, TARGETS, CalibrationOptions
from daemon.quant.frames import DEFAULT_JPEG_QUALITY, FrameSpec
from daemon.quant.keep import DEFAULT_KEEP, PRESETS

if TYPE_CHECKING:
    from daemon.fidelity.compare import FidelityReport

log = logging.getLogger(__name__)


def _path(text: str) -> Path:
    """'builtin:NAME' -> the cached file (fetched by hash if missing); anything else a plain path."""
    if text.startswith("builtin:"):
        from daemon.models.fetch import ensure

        return ensure(text.removeprefix("builtin:"))
    return Path(text).expanduser()


def _specs(texts: Sequence[str]) -> list[FrameSpec]:
    specs = [FrameSpec.parse(t) for t in texts]
    return [s.with_path(_path(str(s.path))) for s in specs]


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="FP32 ONNX model (or builtin:yolov8n)")
    parser.add_argument("--frames", required=True, nargs="+", metavar="SRC",
                        help="calibration frames: video, JPEG folder or JPEG file, each optionally "
                             "PATH@START:STOP[:STEP] (e.g. builtin:vtest@:300)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help=f"calibration method (default {DEFAULT_METHOD}; entropy is the real KL search)")
    parser.add_argument("--target", choices=TARGETS, default="tensorrt",
                        help="tensorrt: symmetric S8S8 Q/DQ TensorRT accepts; cpu: U8S8, fastest on x86 "
                             "onnxruntime (default tensorrt)")
    defaults = "; ".join(f"{target}: {' '.join(keep)}" for target, keep in DEFAULT_KEEP.items())
    parser.add_argument("--keep", nargs="*", default=None, metavar="NODE",
                        help=f"nodes kept in float: presets {', '.join(PRESETS)}, exact node names, or name "
                             f"prefixes ending in '/' (default {defaults})")
    parser.add_argument("--out", type=Path, help="output model (default <model>.int8.<target>.onnx)")
    parser.add_argument("--percentile", type=float, default=99.999, help="percentile method: kept share (%%)")
    parser.add_argument("--cpu-format", choices=("qdq", "qoperator"), default="qdq", help="cpu target format")
    parser.add_argument("--no-fast-dfl", action="store_true",
                        help="cpu target: keep the export's DFL softmax axis (by default moved to the last axis: "
                             "same outputs, faster on onnxruntime)")
    parser.add_argument("--reduce-range", action="store_true",
                        help="7-bit weights, for x86 CPUs without VNNI (cpu target)")
    parser.add_argument("--ranges", type=Path, help="cache of calibrated ranges: reused when it matches")
    parser.add_argument("--chunk", type=int, default=4, help="frames per calibration pass (~0.5 GB each)")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help="quality video frames are re-encoded with (as the replay source)")


def run_calibrate(args: argparse.Namespace) -> int:
    from daemon.quant.calibrate import CalibrationError, calibrate
    from daemon.quant.frames import FrameSourceError, load_all
    from daemon.quant.keep import KeepError

    try:
        specs = _specs(args.frames)
        frames = load_all(specs, args.jpeg_quality)
        opts = CalibrationOptions(percentile=args.percentile, chunk=args.chunk, cpu_format=args.cpu_format,
                                  reduce_range=args.reduce_range, ranges_path=args.ranges,
                                  fast_dfl=not args.no_fast_dfl)
        keep = None if args.keep is None else tuple(args.keep)
        report = calibrate(_path(args.model), frames, args.method, args.target, keep, args.out, opts,
                           frame_sources=[str(s) for s in specs])
    except (CalibrationError, FrameSourceError, KeepError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.trt_check is not None and not report.trt_check.ok:
        print("calibrate: the model fails the TensorRT structural check", file=sys.stderr)
        return 1
    return 0


def add_fidelity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, help="reference model, usually FP32 (or builtin:yolov8n)")
    parser.add_argument("--candidate", required=True, type=Path, help="candidate model, e.g. the INT8 one")
    parser.add_argument("--frames", required=True, nargs="+", metavar="SRC",
                        help="held-out frames (the candidate's calibration frames are left out automatically)")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default 0.25)")
    parser.add_argument("--candidate-conf", type=float, help="candidate's deployed threshold (default: --conf)")
    parser.add_argument("--ranking-conf", type=float, default=RANKING_CONF,
                        help=f"candidate boxes down to this score for the ranked (COCO-practice) view "
                             f"(default {RANKING_CONF}; 0 turns that view off)")
    parser.add_argument("--judge", choices=("ranked", "published"), default="ranked",
                        help="which view the --require-* limits apply to (default ranked)")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU (default 0.7)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime CPU threads (default 2)")
    parser.add_argument("--min-objects", type=int, default=50, help="classes reported on their own from this many")
    parser.add_argument("--json", type=Path, help="report path (default <candidate>.fidelity.json)")
    parser.add_argument("--plot", type=Path, help="PNG path (default <candidate>.fidelity.png)")
    parser.add_argument("--require-map50", type=float, help="exit 1 if object-weighted mAP50 is lower")
    parser.add_argument("--require-map50-95", type=float, help="exit 1 if object-weighted mAP50-95 is lower")
    parser.add_argument("--require-class-ap50", type=float,
                        help="exit 1 if a class with >= --min-objects objects has a lower AP50")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY)


def run_fidelity(args: argparse.Namespace) -> int:
    from daemon.fidelity.compare import FidelityError, compare_models, write_plot
    from daemon.inference.model import ModelError
    from daemon.quant.frames import FrameSourceError, load_all

    try:
        specs = _specs(args.frames)
        frames = load_all(specs, args.jpeg_quality)
        report = compare_models(_path(args.reference), args.candidate, frames, conf=args.conf, iou=args.iou,
                                candidate_conf=args.candidate_conf, threads=args.threads,
                                ranking_conf=args.ranking_conf or None,
                                min_objects=args.min_objects, frame_sources=[str(s) for s in specs])
    except (FidelityError, FrameSourceError, ModelError) as exc:
        print(f"fidelity: {exc}", file=sys.stderr)
        return 2
    out_json = report.write_json(args.json or args.candidate.with_suffix(".fidelity.json"))
    plot = write_plot(report, args.plot or args.candidate.with_suffix(".fidelity.png"))
    print(report.summary())
    print(f"  wrote {out_json}" + (f" and {plot}" if plot else " (no plot: matplotlib missing)"))
    return _requirements(report, args)


def _requirements(report: FidelityReport, args: argparse.Namespace) -> int:
    m = report.ranked if args.judge == "ranked" and report.ranked is not None else report.published
    failed = []
    if args.require_map50 is not None and not m.map50_weighted >= args.require_map50:
        failed.append(f"{args.judge} object-weighted mAP50 {m.map50_weighted:.4f} < {args.require_map50}")
    if args.require_map50_95 is not None and not m.map50_95_weighted >= args.require_map50_95:
        failed.append(f"{args.judge} object-weighted mAP50-95 {m.map50_95_weighted:.4f} < {args.require_map50_95}")
    if args.require_class_ap50 is not None:
        failed.extend(f"{args.judge} class {c.name} ({c.ref_objects} objects) AP50 {c.ap50:.4f} < "
                      f"{args.require_class_ap50}" for c in m.major() if not c.ap50 >= args.require_class_ap50)
    for f in failed:
        print(f"fidelity: FAILED {f}", file=sys.stderr)
    return 1 if failed else 0


def add_sensitivity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="FP32 ONNX model (or builtin:yolov8n)")
    parser.add_argument("--ranges", required=True, type=Path, help="a range cache written by calibrate --ranges")
    parser.add_argument("--frames", required=True, nargs="+", metavar="SRC", help="held-out frames")
    parser.add_argument("--class", dest="class_name", required=True, help="class name (e.g. bird)")
    parser.add_argument("--target", choices=TARGETS, default="tensorrt", help="the ranges' target")
    parser.add_argument("--mode", choices=("only", "without"), default="only",
                        help="only: quantize one block, rest float; without: default INT8 with one block float")
    parser.add_argument("--groups", nargs="*", help="blocks to test (default all), e.g. /model.2/ /model.22/cv3.0/")
    parser.add_argument("--min-score", type=float, default=0.18,
                        help="use the frames where the reference scores the class at least this high somewhere")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY)


def run_sensitivity(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from daemon.inference.model import load_model
    from daemon.quant.frames import load_all
    from daemon.quant.sensitivity import SensitivityRow, block_sensitivity

    model = _path(args.model)
    names = list(load_model(model).class_names)
    if args.class_name not in names:
        print(f"sensitivity: no class {args.class_name!r} in {model.name}", file=sys.stderr)
        return 2
    data = json.loads(args.ranges.read_text())
    ranges = {k: (float(v[0]), float(v[1])) for k, v in data["ranges"].items()}
    frames = load_all(_specs(args.frames), args.jpeg_quality)

    def show(r: SensitivityRow) -> None:
        print(f"  {r.group:<20} {r.convs:3d} convs {r.params:8d} params  AP50 ranked {r.ap50_ranked:.4f} "
              f"published {r.ap50_published:.4f}  score RMS {r.score_rms:.4f}", flush=True)

    used, rows = block_sensitivity(model, ranges, data["key"]["method"], frames, names.index(args.class_name),
                                   target=args.target, mode=args.mode, groups=args.groups,
                                   min_score=args.min_score, threads=args.threads, log=show)
    print(f"sensitivity of {args.class_name} ({args.mode} mode) on {used} of {len(frames)} frames")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m daemon.quant.cli_commands")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    add_calibrate_arguments(sub.add_parser("calibrate", help="INT8 calibration into a Q/DQ ONNX"))
    add_fidelity_arguments(sub.add_parser("fidelity", help="candidate vs reference detections, size, speed"))
    add_sensitivity_arguments(sub.add_parser("sensitivity", help="per-block INT8 sensitivity of one class"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runners = {"calibrate": run_calibrate, "fidelity": run_fidelity, "sensitivity": run_sensitivity}
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
