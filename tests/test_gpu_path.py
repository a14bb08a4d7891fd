"""The GPU data path. CPU-side parts (backend choice, TensorRT engine cache keys, fallbacks) run everywhere;
the `gpu` tests need a CUDA GPU with CuPy, DALI and onnxruntime-gpu (run on the GPU machine)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.backend import BackendUnavailable, build_engine
from daemon.config.model import ModelConfig
from daemon.decode.letterbox import letterbox_into, letterbox_params
from daemon.gpu.capabilities import Capabilities, choose, detect
from daemon.gpu.tensorrt_engine import engine_key, major_version
from daemon.inference.model import load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.inference.yolo import decode_output, to_detections

NO_GPU = Capabilities(False, "", False, False, False, False, None, ("no CUDA GPU",))
H100 = Capabilities(True, "NVIDIA H100 80GB HBM3", True, True, False, True, None, ())


@pytest.mark.parametrize(
    ("backend", "caps", "chosen", "reason_part"),
    [
        ("auto", NO_GPU, "cpu:onnxruntime", "no CUDA GPU found"),
        ("onnxruntime", NO_GPU, "cpu:onnxruntime", "backend onnxruntime asked for"),
        ("tensorrt", NO_GPU, "unavailable", "needs a CUDA GPU"),
        ("auto", H100, "gpu:dali+onnxruntime-cuda", "TensorRT not installed"),
        ("tensorrt", H100, "unavailable", "TensorRT is not installed on NVIDIA H100"),
        ("auto", replace(H100, tensorrt="10.13.0"), "gpu:dali+tensorrt", "TensorRT 10.13.0"),
        ("onnxruntime", replace(H100, dali=False, nvimgcodec=True), "gpu:nvimgcodec+onnxruntime-cuda", "nvimgcodec"),
        ("auto", replace(H100, onnxruntime_cuda=False), "cpu:onnxruntime", "onnxruntime-gpu missing"),
    ],
)
def test_backend_choice(backend: str, caps: Capabilities, chosen: str, reason_part: str) -> None:
    got, reason = choose(backend, caps)
    assert got == chosen
    assert reason_part in reason


def test_this_machine_falls_back_to_the_cpu_with_a_reason(model_path: Path) -> None:
    caps = detect()
    if caps.gpu:
        pytest.skip("a GPU is present here")
    choice = build_engine(ModelConfig(path=str(model_path)), 2)
    assert choice.backend == "cpu:onnxruntime"
    assert "no CUDA GPU found" in choice.reason
    with pytest.raises(BackendUnavailable, match="backend tensorrt needs a CUDA GPU"):
        build_engine(ModelConfig(path=str(model_path), backend="tensorrt"), 2)


def test_engine_cache_key_changes_with_every_part(model_path: Path) -> None:
    model = load_model(model_path)
    base = engine_key(model, "10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 16)
    names = {base.filename()}
    for other in (
        engine_key(model, "11.0.0", "NVIDIA H100 80GB HBM3", "fp16", 16),
        engine_key(model, "10.13.0", "NVIDIA H200", "fp16", 16),
        engine_key(model, "10.13.0", "NVIDIA H100 80GB HBM3", "int8", 16),
        engine_key(model, "10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 32),
        engine_key(replace(model, sha256="0" * 64), "10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 16),
    ):
        names.add(other.filename())
    assert len(names) == 6
    assert base.filename() == engine_key(model, "10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 16).filename()
    assert "/" not in base.filename() and base.filename().endswith(".engine")
    assert (base.min_batch, base.opt_batch, base.max_batch) == (1, 16, 16)
    with pytest.raises(ValueError, match="precision"):
        engine_key(model, "10.13.0", "x", "int4", 16)
    assert major_version("11.0.0.1") == 11


# ---------------------------------------------------------------------------------------------- GPU only
def _cpu_dets(model_path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    model = load_model(model_path)
    eng = OnnxRuntimeEngine(model, max_batch=1)
    out = []
    for img in images:
        x = np.zeros((1, 3, 640, 640), np.float32)
        letterbox_into(img, 640, x[0])
        out.append(decode_output(eng.infer(x), model.layout, 0.25, 0.7)[0])
    return out


def _match(cpu: np.ndarray, gpu: np.ndarray) -> None:
    assert len(cpu) == len(gpu), (cpu, gpu)
    for c in cpu:
        d = np.abs(gpu[:, :4] - c[:4]).max(axis=1)
        j = int(np.argmin(d))
        assert d[j] <= 2.0 and gpu[j, 5] == c[5] and abs(gpu[j, 4] - c[4]) <= 0.02, (c, gpu[j])


@pytest.mark.gpu
def test_gpu_detections_match_the_cpu_path(model_path: Path, bus_path: Path, zidane_path: Path,
                                           vtest_path: Path) -> None:
    from daemon.gpu.dali_decode import DaliDecoder
    from daemon.gpu.ort_cuda import OrtCudaEngine
    from daemon.gpu.postprocess import decode_batch, decode_rows
    from daemon.sources.replay import load_jpeg_frames

    jpegs = [bus_path.read_bytes(), zidane_path.read_bytes(), *load_jpeg_frames(vtest_path, 90, limit=6)]
    images = [np.asarray(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)) for j in jpegs]
    model = load_model(model_path)
    dev = DaliDecoder(640, 8).decode(jpegs)
    raw = OrtCudaEngine(model, max_batch=8).infer(dev)
    gpu = decode_batch(raw, model.layout, 0.25, 0.7, 300)
    batched = decode_rows(raw, model.layout, np.full(8, 0.25, np.float32), np.full(8, 0.7, np.float32), 300)
    for cpu_arr, gpu_arr, rows_arr in zip(_cpu_dets(model_path, images), gpu, batched, strict=True):
        _match(cpu_arr, gpu_arr)
        _match(cpu_arr, rows_arr)


@pytest.mark.gpu
def test_dali_and_kernel_letterbox_match_the_cpu_letterbox(bus_path: Path, zidane_path: Path) -> None:
    import cupy

    from daemon.gpu.dali_decode import DaliDecoder
    from daemon.gpu.letterbox_kernel import LetterboxKernel

    jpegs = [bus_path.read_bytes(), zidane_path.read_bytes()]
    dev = cupy.asnumpy(DaliDecoder(640, 2).decode(jpegs))
    kernel = LetterboxKernel()
    for k, j in enumerate(jpegs):
        img = np.asarray(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR))
        ref = np.zeros((3, 640, 640), np.float32)
        lb = letterbox_into(img, 640, ref)
        assert abs(float(dev[k, 0, 0, 0]) - 114 / 255) < 1e-3  # padding is gray 114
        assert float(np.abs(dev[k] - ref).mean()) < 0.02  # JPEG decoders differ by a few levels
        out = cupy.zeros((3, 640, 640), cupy.float32)
        kernel(cupy.asarray(img), letterbox_params(img.shape[1], img.shape[0], 640), 640, out)
        assert float(np.abs(cupy.asnumpy(out) - ref).mean()) < 0.005
        assert lb.pad_x >= 0


@pytest.mark.gpu
def test_cluster_nms_equals_greedy_nms() -> None:
    import cupy

    from daemon.gpu.postprocess import cluster_nms
    from daemon.inference.nms import batched_nms

    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 300))
        xy = rng.uniform(0, 600, (n, 2))
        wh = rng.uniform(5, 120, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        scores = rng.uniform(0, 1, n).astype(np.float32)
        cls = rng.integers(0, 3, n).astype(np.float32)
        want = batched_nms(boxes, scores, cls, 0.5)
        got = cupy.asnumpy(cluster_nms(cupy.asarray(boxes), cupy.asarray(scores), cupy.asarray(cls), 0.5))
        assert sorted(want.tolist()) == sorted(got.tolist())


@pytest.mark.gpu
def test_runtime_on_the_gpu_moves_only_jpeg_bytes(model_path: Path, vtest_path: Path) -> None:
    from daemon.app import Runtime
    from daemon.config.loader import parse_config

    cfg = parse_config(
        "version: 1\nnode: {site: g, area: g, line: g, node: g}\n"
        f"model: {{path: {model_path}}}\ncameras:\n"
        f"  - id: a\n    source: {{type: replay, path: {vtest_path}, realtime: false, loop: false}}\n"
        "batching: {max_batch: 8, max_wait_ms: 5}\nstats: {interval_s: 100}\n"
    )
    rt = Runtime(cfg)
    rt.start()
    try:
        deadline = time.monotonic() + 120
        while not rt.all_ended() and time.monotonic() < deadline:
            time.sleep(0.2)
        snap = rt.stats.snapshot(rt._source_counters(), 10)
    finally:
        rt.stop(10)
    assert rt.stats is not None and snap.backend.startswith("gpu:")
    cam = snap.cameras[0]
    assert cam.processed == 795
    assert cam.bytes_h2d == cam.bytes_in  # only the JPEG bytes went up
    assert 0 < cam.bytes_d2h < cam.processed * 300 * 24
