"""The GPU path's CPU-side parts, run everywhere: backend choice and fallbacks (TensorRT missing ->
onnxruntime-gpu -> CPU, each with its reason), TensorRT engine cache keys, NVML without a GPU, lazy imports."""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from daemon.decode.letterbox import letterbox_params
from daemon.gpu.capabilities import Capabilities, choose, detect, resolve
from daemon.gpu.tensorrt_engine import (
    TensorRTEngine,
    TensorRTUnavailable,
    engine_cache_key,
    engine_key,
    import_tensorrt,
    major_version,
    strongly_typed,
)
from daemon.inference.model import load_model

NO_GPU = Capabilities(False, "", False, False, False, False, None, ("no CUDA GPU",))
H100 = Capabilities(True, "NVIDIA H100 80GB HBM3", True, True, False, True, None, ())
SHA = "75cc3648650bdab6baac92fcff3627148405a9a15aca86ca7117b6d1ab478726"


@pytest.mark.parametrize(
    ("backend", "caps", "chosen", "reason_part"),
    [
        ("auto", NO_GPU, "cpu:onnxruntime", "no CUDA GPU found"),
        ("onnxruntime", NO_GPU, "cpu:onnxruntime", "backend onnxruntime asked for"),
        ("tensorrt", NO_GPU, "unavailable", "needs a CUDA GPU"),
        ("auto", H100, "gpu:dali+onnxruntime-cuda", "TensorRT not installed"),
        ("tensorrt", H100, "unavailable", "TensorRT is not installed on NVIDIA H100"),
        ("auto", replace(H100, tensorrt="10.13.0"), "gpu:dali+tensorrt", "TensorRT 10.13.0"),
        ("onnxruntime", replace(H100, tensorrt="10.13.0"), "gpu:dali+onnxruntime-cuda", "onnxruntime asked for"),
        ("onnxruntime", replace(H100, dali=False, nvimgcodec=True), "gpu:nvimgcodec+onnxruntime-cuda", "nvimgcodec"),
        ("auto", replace(H100, tensorrt="11.0.0", dali=False, nvimgcodec=True), "gpu:nvimgcodec+tensorrt", "11.0"),
        ("tensorrt", replace(H100, tensorrt="10.3.0", dali=False), "unavailable", "no GPU JPEG decoder"),
        ("auto", replace(H100, onnxruntime_cuda=False), "cpu:onnxruntime", "onnxruntime-gpu missing"),
        ("auto", replace(H100, dali=False), "cpu:onnxruntime", "DALI or nvImageCodec missing"),
    ],
)
def test_backend_choice_and_fallback_reasons(backend: str, caps: Capabilities, chosen: str, reason_part: str) -> None:
    got, reason = choose(backend, caps)
    assert got == chosen
    assert reason_part in reason
    resolved = resolve(backend, caps)
    assert (resolved.backend, resolved.reason) == (got, reason)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match=r"backend must be one of auto, onnxruntime, tensorrt, got 'trt'$"):
        choose("trt", NO_GPU)


def test_decoder_preference() -> None:
    assert H100.decoder == "dali" and H100.gpu_path
    both = replace(H100, nvimgcodec=True)
    assert both.decoder == "dali" and both.pick_decoder("nvimgcodec") == "nvimgcodec"
    assert replace(H100, dali=False, nvimgcodec=True).decoder == "nvimgcodec"
    assert replace(H100, dali=False).decoder is None and not replace(H100, dali=False).gpu_path
    assert choose("auto", both, "nvimgcodec")[0] == "gpu:nvimgcodec+onnxruntime-cuda"
    assert choose("auto", both)[0] == "gpu:dali+onnxruntime-cuda"
    chosen, reason = choose("auto", H100, "nvimgcodec")
    assert chosen == "unavailable" and reason == f"gpu_decoder nvimgcodec asked for, but it is not installed on " \
        f"{H100.gpu_name} (dali is)"
    with pytest.raises(ValueError, match="gpu_decoder must be one of auto, dali, nvimgcodec"):
        choose("auto", H100, "nvjpeg")


def test_detect_here_never_imports_tensorrt_without_a_gpu() -> None:
    caps = detect("auto")
    if caps.gpu:
        pytest.skip("a GPU is present here")
    assert caps.backend == "cpu:onnxruntime" and caps.reason == "no CUDA GPU found"
    assert "tensorrt" not in sys.modules
    with pytest.raises(TensorRTUnavailable, match=r"CUDA GPU|CuPy"):
        import_tensorrt()


def test_tensorrt_engine_refuses_cleanly_without_tensorrt(model_path: Path) -> None:
    if detect().gpu and detect().tensorrt:
        pytest.skip("TensorRT can run here")
    with pytest.raises(TensorRTUnavailable):
        TensorRTEngine(load_model(model_path), max_batch=4)


def test_engine_cache_key_is_pure_and_changes_with_every_part() -> None:
    base = ("10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 1, 16, 16)
    key = engine_cache_key(SHA, *base)
    assert key == engine_cache_key(SHA, *base)
    assert key.startswith("75cc3648650b-trt10.13.0-nvidia-h100-80gb-hbm3-fp16-b1-16-16-") and key.endswith(".engine")
    assert all(c.isalnum() or c in "-._" for c in key)
    variants = {
        engine_cache_key("0" * 64, *base),
        engine_cache_key(SHA, "11.0.0", *base[1:]),
        engine_cache_key(SHA, base[0], "NVIDIA H200", *base[2:]),
        engine_cache_key(SHA, *base[:2], "int8", *base[3:]),
        engine_cache_key(SHA, *base[:3], 1, 8, 16),
        engine_cache_key(SHA, *base[:3], 1, 32, 32),
    }
    assert len(variants | {key}) == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((SHA, "10.0", "gpu", "int4", 1, 1, 1), "precision must be one of fp32, fp16, int8"),
        ((SHA, "10.0", "gpu", "fp16", 2, 1, 4), "1 <= min <= opt <= max"),
        (("xyz", "10.0", "gpu", "fp16", 1, 1, 1), "64 lowercase hex"),
        ((SHA, "", "gpu", "fp16", 1, 1, 1), "must be set"),
    ],
)
def test_engine_cache_key_rejects_bad_parts(args: tuple[str, str, str, str, int, int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine_cache_key(*args)


def test_engine_key_of_a_real_model(model_path: Path) -> None:
    model = load_model(model_path)
    key = engine_key(model, "10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 16)
    assert (key.min_batch, key.opt_batch, key.max_batch) == (1, 16, 16)  # made batchable
    assert key.filename() == engine_cache_key(model.sha256, "10.13.0", "NVIDIA H100 80GB HBM3", "fp16", 1, 16, 16)
    assert engine_key(replace(model, made_batchable=False), "10.13.0", "x", "fp16", 16).max_batch == 1
    with pytest.raises(ValueError, match="max_batch"):
        engine_key(model, "10.13.0", "x", "fp16", 0)


def test_tensorrt_version_rules() -> None:
    assert major_version("11.0.0.1") == 11
    with pytest.raises(ValueError, match="cannot read a TensorRT version"):
        major_version("x.y")
    assert strongly_typed("11.1.0", "fp16") and strongly_typed("10.13.0", "int8")
    assert not strongly_typed("10.13.0", "fp16")


def test_nvml_answers_none_without_a_gpu() -> None:
    from daemon.gpu.nvml import Nvml, NvmlSampler

    nvml = Nvml(0)
    if nvml.available:
        pytest.skip("NVML works here")
    assert nvml.sample() is None and "NVML unavailable" in nvml.reason
    with NvmlSampler(nvml, 0.01) as sampler:
        pass
    assert sampler.summary() is None
    nvml.close()


def test_gpu_modules_import_without_gpu_packages() -> None:
    for name in ("bench", "bench_runs", "capabilities", "dali_decode", "kernels", "nvimgcodec_decode", "nvml",
                 "ort_cuda", "decoders", "prepare", "streams", "postprocess", "tensorrt_engine"):
        importlib.import_module(f"daemon.gpu.{name}")
    if not detect().gpu:
        assert not any(m.startswith(("nvidia.dali", "tensorrt")) for m in sys.modules)


@pytest.mark.parametrize(("w", "h"), [(768, 576), (1280, 960), (810, 1080), (1280, 720), (641, 479), (5, 3000)])
def test_kernel_geometry_is_the_cpu_letterbox(w: int, h: int) -> None:
    from daemon.gpu.kernels import geometry

    lb, nw, nh = geometry(w, h, 640)
    assert lb == letterbox_params(w, h, 640)
    assert max(nw, nh) == 640 or (nw == 640 or nh == 640)
    assert 0 <= lb.pad_x <= 640 - nw and 0 <= lb.pad_y <= 640 - nh


def test_bench_parses_and_refuses_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    from daemon.gpu import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--cameras", "16", "--sizes", "native"])
    assert (args.cameras, args.batch, args.precision, args.sizes) == (16, 32, "fp16", "native")
    if detect().gpu_path:
        pytest.skip("the GPU path can run here")
    assert bench.run(args) == 2
    assert "cannot run here" in capsys.readouterr().out


def test_several_frames_of_a_camera_are_planned_in_order_over_rounds() -> None:
    """The GPU path scores a batch's change maps per round: each round holds at most one frame of a camera, so
    a camera's second frame is scored against the reference its first frame left (and one device launch never
    updates a camera's reference twice)."""
    from daemon.gpu.prepare import planning_rounds

    batch = [("a", 0), ("b", 0), ("a", 1), ("c", 0), ("a", 2), ("b", 1)]
    rounds = planning_rounds(batch, lambda item: item[0])
    assert rounds == [[("a", 0), ("b", 0), ("c", 0)], [("a", 1), ("b", 1)], [("a", 2)]]
    assert all(len({cam for cam, _ in r}) == len(r) for r in rounds)
    assert planning_rounds([], lambda item: item[0]) == []


def test_models_newer_than_the_cuda_eps_opset_are_converted_to_it_unchanged_in_output(model_path: Path) -> None:
    """Ultralytics' opset-22 export: onnxruntime-gpu's CUDA EP has no opset-22 MaxPool and ran SPPF's on the CPU;
    the GPU engine loads the model at opset 21, whose outputs are the same (checked here on the CPU EP)."""
    import onnx
    import onnxruntime as ort

    from daemon.gpu.ort_cuda import CUDA_EP_OPSET, for_cuda_ep

    data = model_path.read_bytes()
    opset = next(o.version for o in onnx.load_from_string(data).opset_import if o.domain in ("", "ai.onnx"))
    converted = for_cuda_ep(data)
    got = next(o.version for o in onnx.load_from_string(converted).opset_import if o.domain in ("", "ai.onnx"))
    assert got == min(opset, CUDA_EP_OPSET)
    assert for_cuda_ep(converted) == converted  # already at or below: unchanged
    x = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    outs = [ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
            for b in (data, converted)]
    assert np.array_equal(outs[0], outs[1])
