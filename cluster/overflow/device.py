"""The CUDA device of a worker's threads.

CuPy's (and the CUDA runtime's) current device is per thread and starts at 0 on every new thread. A worker that
sees every GPU of its node (``workers.overflow.all_devices_visible``, see cluster/worker.py) runs on its own GPU,
so each thread that allocates or copies device memory for its runtime (the replica's call threads, the overflow
and checkpoint threads, the guest pipeline's build) must make that GPU current first; else its arrays land on
GPU 0 and are then used as another device's (CUDA error 700, or silent cross-GPU traffic).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)


def cuda_ordinal(gpu: int | None, visible: str | None = None) -> int | None:
    """The CUDA ordinal of Ray GPU id ``gpu`` in a process that sees every GPU of the node: Ray's ids are the
    node's CUDA_VISIBLE_DEVICES entries (3 and 5 with CUDA_VISIBLE_DEVICES=3,5), the process sees them as 0, 1."""
    if gpu is None:
        return None
    vis = [v.strip() for v in (os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible).split(",")
           if v.strip()]
    return vis.index(str(gpu)) if str(gpu) in vis else gpu


def set_device(device: int | None) -> None:
    """Make ``device`` this thread's current CUDA device (None, or no CuPy: nothing to do)."""
    if device is None:
        return
    try:
        import cupy
    except ImportError:
        return
    cupy.cuda.runtime.setDevice(device)


@contextlib.contextmanager
def on_device(device: int | None) -> Iterator[None]:
    """``device`` current for the block (restored after); None: nothing changes."""
    if device is None:
        yield
        return
    import cupy

    with cupy.cuda.Device(device):
        yield


__all__ = ["cuda_ordinal", "on_device", "set_device"]
