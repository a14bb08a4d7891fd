"""daemon.lent: the checks a guest makes of a loan's arrays before it opens their handle or reads their bytes, on
synthetic loans (a real DYCS state without arrays, specs as ``export_host`` lays them out, then changed)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest

from daemon.delta.policy import CameraDeltaState
from daemon.features.state import CameraState, StateError
from daemon.gpu.ipc import MAX_SHARED_BYTES, ArraySpec, SharedArrays, export_host, read_shared
from daemon.lent import MAX_LENT_ARRAYS, check_lent_arrays, signature_on_host

SIG = np.arange(80 * 80, dtype=np.uint8).reshape(80, 80)
FEAT = np.zeros((4, 5, 7), np.float16)


def _state(signature: Any = None) -> CameraState:
    now = time.monotonic()
    return CameraState(camera="b", signature=signature, features=(), detections=(),
                       policy=CameraDeltaState(True, 0, now, 0), noise_floor=0.0, last_inferred=now, now=now,
                       model_sha256="", taps=())


def _loan() -> SharedArrays:
    return export_host([("signature", SIG), ("features.0", FEAT), ("features.1", FEAT)])


def _spec(i: int, **change: Any) -> SharedArrays:
    shared = _loan()
    specs = list(shared.specs)
    specs[i] = dataclasses.replace(specs[i], **change)
    return dataclasses.replace(shared, specs=tuple(specs))


def _specs(*names: str) -> SharedArrays:
    return dataclasses.replace(_loan(), specs=tuple(ArraySpec(n, (2, 2), "uint8", 0) for n in names))


CASES: list[tuple[str, SharedArrays, str]] = [
    ("feature gap", _specs("signature", "features.1"), "lent arrays named ['signature', 'features.1']"),
    ("no signature", _specs("features.0", "features.1"), "lent arrays named"),
    ("twice", _specs("signature", "signature"), "lent arrays named"),
    ("unknown name", _specs("signature", "weights"), "lent arrays named"),
    ("too many", _specs("signature", *(f"features.{i}" for i in range(MAX_LENT_ARRAYS))), "at most 64 arrays"),
    ("not a dtype", _spec(0, dtype="x9"), "dtype 'x9' is not a dtype"),
    ("dtype no state holds", _spec(1, dtype="float64"), "dtype 'float64' not allowed"),
    ("object dtype", _spec(1, dtype="object"), "dtype 'object' not allowed"),
    ("negative side", _spec(1, shape=(4, -5, 7)), "is not at most 4 non-negative sides"),
    ("five sides", _spec(1, shape=(1, 1, 1, 1, 1)), "is not at most 4 non-negative sides"),
    ("3-D signature", _spec(0, shape=(80, 80, 1)), "a signature is a 2-D uint8 array, not (80, 80, 1) uint8"),
    ("float signature", _spec(0, dtype="float16", shape=(40, 80)), "a signature is a 2-D uint8 array"),
    ("negative offset", _spec(1, offset=-256), "bytes at offset -256 do not fit"),
    ("past the bytes", _spec(2, offset=len(_loan().data)), "do not fit the loan's"),
    ("bytes short", dataclasses.replace(_loan(), data=_loan().data[:100]), "do not fit the loan's 100 bytes"),
    ("past the shared limit", dataclasses.replace(_spec(1, offset=MAX_SHARED_BYTES), route="peer"),
     "do not fit a shared buffer"),
    ("unknown route", dataclasses.replace(_loan(), route="mail"), "by route 'mail'"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("shared", "said"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_loan_is_refused_with_what_is_wrong(shared: SharedArrays, said: str) -> None:
    with pytest.raises(StateError) as err:
        check_lent_arrays(_state(), shared)
    assert said in str(err.value)


def test_arrays_both_inside_the_state_bytes_and_apart_are_refused() -> None:
    with pytest.raises(StateError, match="both inside its state bytes and apart"):
        check_lent_arrays(_state(SIG), _loan())


@pytest.mark.parametrize("route", ["host", "peer"])
def test_a_loan_as_borrow_makes_it_passes_and_reads(route: str) -> None:
    shared = dataclasses.replace(_loan(), route=route)
    check_lent_arrays(_state(), shared)
    if route == "host":
        sig, f0, f1 = read_shared(shared)
        assert np.array_equal(signature_on_host(sig), SIG) and f0.shape == f1.shape == FEAT.shape


def test_a_failed_copy_of_the_signature_to_the_host_is_a_state_error() -> None:
    class Device:
        def get(self) -> Any:
            raise RuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    with pytest.raises(StateError, match="copying the lent signature to the host failed: RuntimeError: cuda"):
        signature_on_host(Device())
    assert signature_on_host(SIG) is SIG
