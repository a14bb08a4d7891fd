"""The runner's stage ordering on the GPU: one non-blocking CUDA stream per stage thread, events between them.

``bind`` makes the stage's stream the thread's current CuPy stream (CuPy's current stream is per thread), so
every CuPy kernel and copy a stage issues (decode, letterbox, region packing, NMS) lands on it; onnxruntime is
built with ``infer`` as its ``user_compute_stream``. ``mark`` records an event on the calling stage's stream and
``wait`` makes the calling stage's stream wait for one: stage n+1 starts on the device when stage n ends there,
and no thread waits on the host for another stage's work.
"""

from __future__ import annotations

from typing import Any


class CudaStages:
    """Implements daemon.pipeline.runner.StageSync."""

    def __init__(self, device_id: int = 0) -> None:
        import cupy

        self._cp = cupy
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self.streams = {name: cupy.cuda.Stream(non_blocking=True) for name in ("pre", "infer", "post")}

    @property
    def infer(self) -> Any:
        return self.streams["infer"]

    def bind(self, stage: str) -> None:
        self._cp.cuda.Device(self.device_id).use()
        self.streams[stage].use()

    def mark(self) -> Any:
        ev = self._cp.cuda.Event(block=False, disable_timing=True)
        ev.record(self._cp.cuda.get_current_stream())
        return ev

    def wait(self, token: Any) -> None:
        if token is not None:
            self._cp.cuda.get_current_stream().wait_event(token)
