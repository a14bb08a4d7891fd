"""NVML readings for stats and benchmarks: PCIe TX/RX throughput and GPU memory (package nvidia-ml-py, module
pynvml). Everything answers None where NVML is unavailable (no driver, no GPU, package missing).

NVML's PCIe counters are KB/s over a 20 ms window: RX is what the GPU received (host-to-device), TX what it sent.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NvmlSample:
    pcie_rx_mb_s: float  # host -> device
    pcie_tx_mb_s: float  # device -> host
    mem_used_mb: float
    mem_total_mb: float


@dataclass(frozen=True, slots=True)
class NvmlSummary:
    samples: int
    pcie_rx_mb_s: float  # means over the samples
    pcie_tx_mb_s: float
    mem_used_peak_mb: float


class Nvml:
    """One GPU's NVML handle. ``available`` is False (and ``sample`` returns None) where NVML cannot start."""

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index
        self.reason = ""
        self._nv: Any = None
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nv = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self.reason = f"NVML unavailable: {type(exc).__name__}: {exc}"
            log.debug("%s", self.reason)

    @property
    def available(self) -> bool:
        return self._nv is not None

    def sample(self) -> NvmlSample | None:
        if self._nv is None:
            return None
        nv, h = self._nv, self._handle
        try:
            rx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES) / 1000.0
            tx = nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES) / 1000.0
            mem = nv.nvmlDeviceGetMemoryInfo(h)
        except Exception as exc:
            log.debug("NVML sample failed: %s", exc)
            return None
        return NvmlSample(float(rx), float(tx), mem.used / 1e6, mem.total / 1e6)

    def close(self) -> None:
        if self._nv is not None:
            try:
                self._nv.nvmlShutdown()
            except Exception as exc:
                log.debug("nvmlShutdown: %s", exc)
            self._nv = None


class NvmlSampler:
    """Samples an ``Nvml`` every ``interval_s`` on a thread while the ``with`` block runs."""

    def __init__(self, nvml: Nvml, interval_s: float = 0.05) -> None:
        self._nvml = nvml
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples: list[NvmlSample] = []

    def __enter__(self) -> NvmlSampler:
        if self._nvml.available:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            s = self._nvml.sample()
            if s is not None:
                self.samples.append(s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def summary(self) -> NvmlSummary | None:
        if not self.samples:
            return None
        n = len(self.samples)
        return NvmlSummary(n, sum(s.pcie_rx_mb_s for s in self.samples) / n,
                           sum(s.pcie_tx_mb_s for s in self.samples) / n,
                           max(s.mem_used_mb for s in self.samples))
