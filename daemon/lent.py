"""Checks of the arrays a home lends apart from a camera's state bytes (daemon.guest: ``BorrowedState.arrays``):
they come from another process, so the guest refuses a malformed loan (StateError: the camera runs cold) before it
opens the loan's IPC handle or reads its bytes, and a failed device-to-host copy of the lent signature is that
camera's failure too, never its whole batch's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from daemon.delta.tracker import to_host_array
from daemon.gpu.ipc import MAX_SHARED_BYTES, ArraySpec, SharedArrays

if TYPE_CHECKING:
    from daemon.features.state import CameraState

MAX_LENT_ARRAYS = 64  # arrays in one loan: the signature and one feature map per tap
MAX_LENT_NDIM = 4


def check_lent_arrays(state: CameraState, shared: SharedArrays) -> None:
    """Raise StateError unless ``shared`` is what ``borrow`` lends beside ``state``'s bytes: arrays named
    "signature" (2-D uint8) and "features.0" .. "features.N-1", each of a state dtype, a shape of at most
    ``MAX_LENT_NDIM`` non-negative sides and a non-negative offset, within the bytes on the host route, while the
    state's bytes hold no arrays of their own. A loan comes from another process: the guest checks it before
    opening its handle or reading its bytes."""
    from daemon.features.state import StateError

    if state.signature is not None or state.features:
        raise StateError("the loan carries reference arrays both inside its state bytes and apart")
    if shared.route not in ("peer", "host"):
        raise StateError(f"lent arrays travel by route {shared.route!r}, not peer or host")
    names = [s.name for s in shared.specs]
    wanted = ["signature", *(f"features.{i}" for i in range(len(names) - 1))]
    if (len(names) > MAX_LENT_ARRAYS or not all(isinstance(n, str) for n in names)
            or sorted(names) != sorted(wanted)):  # each name once
        shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
        raise StateError(f"lent arrays named [{shown}]; a loan holds \"signature\" and \"features.0\" .. "
                         f"\"features.N-1\" (at most {MAX_LENT_ARRAYS} arrays)")
    for spec in shared.specs:
        _check_spec(spec, shared)


def _check_spec(spec: ArraySpec, shared: SharedArrays) -> None:
    """One lent array's spec (``check_lent_arrays``)."""
    from daemon.features.state import DTYPES, StateError

    what = f"lent array {spec.name!r}"
    try:
        dtype = np.dtype(spec.dtype)
    except (TypeError, ValueError) as exc:
        raise StateError(f"{what}: dtype {spec.dtype!r} is not a dtype") from exc
    if dtype.str not in DTYPES:
        raise StateError(f"{what}: dtype {spec.dtype!r} not allowed (a state holds {sorted(DTYPES)})")
    shape = spec.shape
    if (not isinstance(shape, tuple) or len(shape) > MAX_LENT_NDIM
            or not all(isinstance(n, int) and 0 <= n <= MAX_SHARED_BYTES for n in shape)):
        raise StateError(f"{what}: shape {shape!r} is not at most {MAX_LENT_NDIM} non-negative sides")
    if spec.name == "signature" and (len(shape) != 2 or dtype != np.uint8):
        raise StateError(f"{what}: a signature is a 2-D uint8 array, not {shape} {dtype}")
    nbytes = math.prod(shape) * dtype.itemsize
    end = spec.offset + nbytes if isinstance(spec.offset, int) and spec.offset >= 0 else -1
    host = shared.route == "host"
    limit = len(shared.data) if host else MAX_SHARED_BYTES
    if not 0 <= end <= limit:
        room = f"the loan's {limit} bytes" if host else f"a shared buffer (at most {limit} bytes)"
        raise StateError(f"{what}: {nbytes} bytes at offset {spec.offset!r} do not fit {room}")


def signature_on_host(sig: Any) -> NDArray[Any]:
    """The lent signature as a numpy array: one read over peer access is on the guest's device and is copied back
    here, where a CUDA error (or out of memory) makes this camera's loan unusable (StateError), not the batch."""
    from daemon.features.state import StateError

    try:
        return np.asarray(to_host_array(sig))
    except Exception as exc:  # CuPy's CUDARuntimeError, OutOfMemoryError, ...: a failure of this loan's copy
        raise StateError(f"copying the lent signature to the host failed: {type(exc).__name__}: {exc}") from exc


__all__ = ["MAX_LENT_ARRAYS", "MAX_LENT_NDIM", "check_lent_arrays", "signature_on_host"]
