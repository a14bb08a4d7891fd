"""A camera's reference state (signature, feature maps, cached detections, policy counters) as bytes or as one
device buffer, so a camera can move to another GPU or host without a cold start.

Format, version 1 (little-endian; no pickle)::

    magic "DYCS" (4 bytes), version u16 = 1, reserved u16 = 0, json_len u32, blob_len u64,
    JSON metadata (UTF-8, json_len bytes),
    blob (blob_len bytes): the arrays, raw little-endian, each at a 64-byte aligned offset

The JSON holds the camera id, the model's sha256 and tap names (an importer checks they match its model), the
policy counters, the noise floor, the detections (ages, not clock values: clocks differ between hosts) and, per
array, its name, dtype (one of ``|u1 <f4 <f2 <i1``), shape, offset and length.

On the GPU path :func:`pack` keeps the blob on the device (CuPy), :func:`move_blob` copies it to another GPU
(peer to peer, or through the host) and :func:`unpack` makes the arrays views into it; :func:`to_bytes` /
:func:`from_bytes` are the host form for storage and other machines.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.delta.policy import CameraDeltaState, Rect
from daemon.features.codec import array_module, to_host
from daemon.types import Detection

MAGIC = b"DYCS"
VERSION = 1
HEADER = struct.Struct("<4sHHIQ")
ALIGN = 64
DTYPES = frozenset({"|u1", "<f4", "<f2", "<i1"})
MAX_JSON_BYTES = 8 << 20  # a state's metadata (detections included) above this is refused
MAX_IN_FLIGHT_REGIONS = 4096  # regions of frames in flight at export (optional "in_flight" key)
MAX_BLOB_BYTES = 1 << 30  # and arrays above this (a yolov8n reference is ~1.2 MB in FP16)


class StateError(Exception):
    """Camera state bytes that cannot be read, or that do not fit the importing model."""


@dataclass(frozen=True, slots=True)
class InFlightArea:
    """Where frames planned but not yet resolved when a state was exported already changed its reference while
    their detections are not in it yet: the whole frame (``full``: one of them was FULL) or ``regions`` (model-input
    pixels). An importer infers there on its first frame, on top of its change map (DeltaTracker.import_state)."""

    full: bool
    regions: tuple[Rect, ...] = ()


@dataclass(frozen=True, slots=True)
class CameraState:
    """One camera's delta-caching state. ``features``: one (C, H, W) array per tap (numpy or CuPy);
    ``policy.key_time`` and ``last_inferred`` are in the exporting process's clock, ``now`` at export."""

    camera: str
    signature: Any | None  # (h, w) uint8 luma signature of the reference
    features: tuple[Any, ...]
    detections: tuple[Detection, ...]  # with age_s at ``now``
    policy: CameraDeltaState
    noise_floor: float
    last_inferred: float
    now: float
    model_sha256: str = ""
    taps: tuple[str, ...] = ()
    in_flight: InFlightArea | None = None  # None: every frame planned before the export was resolved (or SKIP)

    @property
    def nbytes(self) -> int:
        sig = 0 if self.signature is None else int(self.signature.nbytes)
        return sig + sum(int(f.nbytes) for f in self.features)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _dtype_name(a: Any) -> str:
    name = str(np.dtype(a.dtype).newbyteorder("<").str)
    if name not in DTYPES:
        raise StateError(f"array of dtype {a.dtype} cannot be stored (allowed: {sorted(DTYPES)})")
    return name


def _metadata(state: CameraState, arrays: list[tuple[str, Any]]) -> tuple[dict[str, Any], int]:
    specs, off = [], 0
    for name, a in arrays:
        specs.append({"name": name, "dtype": _dtype_name(a), "shape": [int(v) for v in a.shape], "offset": off,
                      "nbytes": int(a.nbytes)})
        off = _aligned(off + int(a.nbytes))
    p = state.policy
    meta = {
        "camera": state.camera, "model_sha256": state.model_sha256, "taps": list(state.taps),
        "policy": {"has_reference": p.has_reference, "frames_since_key": p.frames_since_key,
                   "key_age_s": state.now - p.key_time, "drift_tiles": p.drift_tiles},
        "noise_floor": state.noise_floor, "last_inferred_age_s": state.now - state.last_inferred,
        "detections": [{"class_id": d.class_id, "class_name": d.class_name, "score": d.score, "x1": d.x1,
                        "y1": d.y1, "x2": d.x2, "y2": d.y2, "cached": d.cached, "age_s": d.age_s}
                       for d in state.detections],
        "arrays": specs,
    }
    if state.in_flight is not None:  # optional key (v1 readers before it ignore it; absent: None)
        meta["in_flight"] = {"full": state.in_flight.full,
                             "regions": [[r.x1, r.y1, r.x2, r.y2] for r in state.in_flight.regions]}
    return meta, off


def pack(state: CameraState) -> tuple[bytes, Any]:
    """(header + JSON, blob): the blob holds every array and lives where the features live (numpy/CuPy)."""
    arrays: list[tuple[str, Any]] = [(f"features.{i}", f) for i, f in enumerate(state.features)]
    if state.signature is not None:
        arrays.insert(0, ("signature", state.signature))
    meta, total = _metadata(state, arrays)
    xp = array_module(state.features[0]) if state.features else np
    blob = xp.zeros(total, dtype=xp.uint8)
    for spec, (_, a) in zip(meta["arrays"], arrays, strict=True):
        src = xp.ascontiguousarray(xp.asarray(a), dtype=np.dtype(spec["dtype"]))
        blob[spec["offset"] : spec["offset"] + spec["nbytes"]] = src.view(xp.uint8).ravel()
    text = json.dumps(meta, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, VERSION, 0, len(text), total) + text, blob


def to_bytes(state: CameraState) -> bytes:
    head, blob = pack(state)
    return head + to_host(blob).tobytes()


def _read_head(data: bytes) -> tuple[dict[str, Any], int, int]:
    """(metadata, header+JSON length, blob length)."""
    if len(data) < HEADER.size:
        raise StateError(f"camera state of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, _r, jlen, blen = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise StateError(f"not a camera state (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise StateError(f"camera state version {version} is not supported (this reader knows {VERSION})")
    if jlen > MAX_JSON_BYTES or blen > MAX_BLOB_BYTES:
        raise StateError(f"camera state too large: JSON {jlen} bytes (limit {MAX_JSON_BYTES}), arrays {blen} bytes "
                         f"(limit {MAX_BLOB_BYTES})")
    if len(data) < HEADER.size + jlen:
        raise StateError(f"camera state truncated: JSON of {jlen} bytes, {len(data) - HEADER.size} left")
    try:
        meta = json.loads(bytes(data[HEADER.size : HEADER.size + jlen]).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateError(f"camera state metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise StateError("camera state metadata is not a JSON object")
    return meta, HEADER.size + jlen, int(blen)


def unpack(head: bytes, blob: Any, now: float) -> CameraState:
    """A state whose arrays are views into ``blob`` (numpy or CuPy, as :func:`pack` made it); clock values are
    rebuilt from the stored ages against ``now`` (the importer's clock)."""
    meta, _, blen = _read_head(head)
    if int(blob.size) < blen:
        raise StateError(f"camera state blob has {int(blob.size)} bytes, the header says {blen}")
    try:
        arrays = {s["name"]: _view(blob, s, blen) for s in meta["arrays"]}
        feats = tuple(arrays[f"features.{i}"] for i in range(sum(n.startswith("features.") for n in arrays)))
        p = meta["policy"]
        policy = CameraDeltaState(bool(p["has_reference"]), int(p["frames_since_key"]), now - float(p["key_age_s"]),
                                  int(p["drift_tiles"]))
        dets = tuple(Detection(int(d["class_id"]), str(d["class_name"]), float(d["score"]), float(d["x1"]),
                               float(d["y1"]), float(d["x2"]), float(d["y2"]), bool(d["cached"]), float(d["age_s"]))
                     for d in meta["detections"])
        return CameraState(
            camera=str(meta["camera"]), signature=arrays.get("signature"), features=feats, detections=dets,
            policy=policy, noise_floor=float(meta["noise_floor"]),
            last_inferred=now - float(meta["last_inferred_age_s"]), now=now,
            model_sha256=str(meta["model_sha256"]), taps=tuple(str(t) for t in meta["taps"]),
            in_flight=_in_flight_of(meta.get("in_flight")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"camera state metadata is incomplete or malformed: {type(exc).__name__}: {exc}") from exc


def _in_flight_of(v: Any) -> InFlightArea | None:
    if v is None:
        return None
    raw = v["regions"]
    if not isinstance(raw, list) or len(raw) > MAX_IN_FLIGHT_REGIONS:
        raise StateError(f"camera state in_flight regions are not a list of at most {MAX_IN_FLIGHT_REGIONS}")
    return InFlightArea(bool(v["full"]), tuple(Rect(*(int(c) for c in r)) for r in raw))  # not 4: TypeError


def _view(blob: Any, spec: dict[str, Any], blen: int) -> Any:
    dtype, off, nb, shape = str(spec["dtype"]), int(spec["offset"]), int(spec["nbytes"]), tuple(spec["shape"])
    if dtype not in DTYPES:
        raise StateError(f"array {spec['name']!r}: dtype {dtype!r} not allowed")
    if off < 0 or off + nb > blen or int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize != nb:
        raise StateError(f"array {spec['name']!r}: {nb} bytes at {off} do not fit shape {shape} {dtype} in a "
                         f"{blen}-byte blob")
    return blob[off : off + nb].view(np.dtype(dtype)).reshape(shape)


def from_bytes(data: bytes, now: float, device: bool = False) -> CameraState:
    """The state in ``data``; with ``device`` its arrays go to the current CuPy device in one copy."""
    _, hlen, blen = _read_head(data)
    if len(data) != hlen + blen:
        raise StateError(f"camera state has {len(data)} bytes, the header says {hlen + blen}")
    blob: Any = np.frombuffer(bytearray(data[hlen:]), np.uint8)
    if device:
        import cupy

        blob = cupy.asarray(blob)
    return unpack(data[:hlen], blob, now)


def check_compatible(state: CameraState, model_sha256: str, taps: Sequence[str],
                     shapes: Sequence[tuple[int, int, int]]) -> None:
    """Raise StateError when ``state`` was made by another model or split."""
    if state.model_sha256 and model_sha256 and state.model_sha256 != model_sha256:
        raise StateError(f"camera {state.camera!r}: state was made by model {state.model_sha256[:12]}, this node "
                         f"runs {model_sha256[:12]}")
    if state.taps and tuple(state.taps) != tuple(taps):
        raise StateError(f"camera {state.camera!r}: state has taps {list(state.taps)}, this split {list(taps)}")
    got = [tuple(int(v) for v in f.shape) for f in state.features]
    if got != [tuple(s) for s in shapes]:
        raise StateError(f"camera {state.camera!r}: feature shapes {got} differ from this model's {list(shapes)}")


def move_blob(blob: Any, device: int, peer: bool = True) -> Any:
    """Copy a CuPy blob to GPU ``device``: peer to peer (NVLink/PCIe P2P where the GPUs allow it; CuPy falls
    back to a staged copy otherwise) or through host memory."""
    import cupy

    with cupy.cuda.Device(device):
        if not peer:
            return cupy.asarray(cupy.asnumpy(blob))
        out = cupy.empty_like(blob)
        out.data.copy_from_device(blob.data, int(blob.nbytes))
        return out
