"""The GPU preparer's batched crop copy equals the slice copies it replaces, and the device change map's cost is
timed on the device (CUDA events), not as host wall time."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_crop_copy_matches_slice_assignments(dtype: Any) -> None:
    import cupy

    from daemon.gpu.prepare import CropCopy

    rng = np.random.default_rng(5)
    src = cupy.asarray(rng.random((6, 3, 640, 640)).astype(dtype))
    want = cupy.asarray(rng.random((8, 3, 640, 640)).astype(dtype))
    got = want.copy()
    crops = []
    for k in range(40):  # placements on a canvas never overlap (the packer's rule): each in its own band
        h, w = int(rng.integers(1, 5)) * 32, int(rng.integers(1, 20)) * 32
        y1, x1 = int(rng.integers(0, 640 - h + 1)), int(rng.integers(0, 640 - w + 1))
        y, x = (k // 8) * 128 + int(rng.integers(0, 128 - h + 1)), int(rng.integers(0, 640 - w + 1))
        crops.append((k % 6, y1, x1, h, w, k % 8, y, x))
    for row, y1, x1, h, w, slot, y, x in crops:
        want[slot, :, y : y + h, x : x + w] = src[row, :, y1 : y1 + h, x1 : x1 + w]
    assert CropCopy()(src, got, crops)
    assert bool((got == want).all())
    assert not CropCopy()(src, got.astype(np.float64), crops)  # another dtype: the caller copies slices


def test_change_map_device_time_is_measured_on_the_device() -> None:
    import cupy

    from daemon.delta.policy import Decision, Verdict
    from daemon.gpu.changemap import GpuChangeMaps

    maps = GpuChangeMaps(80, 8)
    stream = cupy.cuda.Stream(non_blocking=True)
    sigs = cupy.asarray(np.random.default_rng(1).integers(0, 255, (16, 80, 80), dtype=np.uint8))
    cams = [f"c{k}" for k in range(16)]
    for k, cam in enumerate(cams):
        maps.upload(cam, cupy.asnumpy(sigs[(k + 1) % 16]))
    for _ in range(3):
        got = maps.scores(sigs, list(range(16)), cams, [2] * 16, stream)
        assert len(got) == 16 and got[0][0].shape == (40, 40)
        maps.follow(sigs, list(range(16)), cams, [Verdict(Decision.FULL, "t")] * 16, stream)
    stream.synchronize()
    assert 0.0 < maps.device_s < 0.05  # kernels of microseconds, not host waits
