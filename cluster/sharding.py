"""Camera groups -> GPUs: rendezvous (highest random weight) hashing with bounded load. Pure.

Every GPU ranks every group by a stable hash of (group, gpu); a group goes to its best-ranked GPU that still has
room under the cap ``ceil(c * total_load / gpus)`` (Mirrokni, Thorup, Zadimoghaddam: consistent hashing with
bounded loads). Groups are placed heaviest first, ties by the group's own hash, so the order does not depend on the
GPU set. A group is the unit: it never splits. Adding a GPU moves about ``groups / (gpus + 1)`` groups (those that
now rank it first, plus a few cascades where a cap shrank); removing one moves only its groups when no other GPU
is at its cap. ``moves(old, new)`` tells what moved.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_LOAD_FACTOR = 1.25


def score(key: str, gpu: str) -> int:
    """The rendezvous weight of ``key`` on ``gpu``: 64 stable bits (the same on every host and run)."""
    digest = hashlib.blake2b(f"{key}\x00{gpu}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(key: str, gpus: Sequence[str]) -> list[str]:
    """The GPUs in ``key``'s order of preference (best first)."""
    return sorted(gpus, key=lambda g: (-score(key, g), g))


def load_cap(total_load: float, n_gpus: int, load_factor: float = DEFAULT_LOAD_FACTOR) -> float:
    """The bounded-load cap per GPU: ``ceil(c * total / n)``."""
    if n_gpus < 1:
        raise ValueError(f"need at least one GPU, got {n_gpus}")
    if load_factor < 1.0:
        raise ValueError(f"load_factor must be >= 1, got {load_factor}")
    return float(math.ceil(load_factor * total_load / n_gpus - 1e-9))


@dataclass(frozen=True, slots=True)
class Move:
    group: str
    source: str | None  # None: the group is new
    target: str | None  # None: the group is gone


def assign(
    groups: Mapping[str, float], gpus: Sequence[str], load_factor: float = DEFAULT_LOAD_FACTOR
) -> dict[str, str]:
    """group id -> GPU id for every group; ``groups`` maps group id to its load (> 0)."""
    if not gpus:
        raise ValueError("cannot place camera groups on zero GPUs")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"GPU ids must be unique, got {list(gpus)}")
    for gid, load in groups.items():
        if not load > 0:
            raise ValueError(f"group {gid!r} has load {load}; loads must be > 0")
    cap = load_cap(sum(groups.values()), len(gpus), load_factor)
    loads = dict.fromkeys(gpus, 0.0)
    out: dict[str, str] = {}
    for gid in sorted(groups, key=lambda g: (-groups[g], score(g, ""), g)):
        w = groups[gid]
        choice = next((g for g in ranking(gid, gpus) if loads[g] + w <= cap), None)
        if choice is None:  # only with uneven weights: the least loaded GPU takes it
            choice = min(gpus, key=lambda g: (loads[g], g))
        loads[choice] += w
        out[gid] = choice
    return out


def gpu_loads(assignment: Mapping[str, str], groups: Mapping[str, float], gpus: Sequence[str]) -> dict[str, float]:
    """Load per GPU (every GPU listed, idle ones at 0)."""
    loads = dict.fromkeys(gpus, 0.0)
    for gid, gpu in assignment.items():
        loads[gpu] = loads.get(gpu, 0.0) + groups.get(gid, 1.0)
    return loads


def moves(old: Mapping[str, str], new: Mapping[str, str]) -> list[Move]:
    """Groups whose GPU differs between two assignments, sorted by group id."""
    out = []
    for gid in sorted(set(old) | set(new)):
        a, b = old.get(gid), new.get(gid)
        if a != b:
            out.append(Move(gid, a, b))
    return out


__all__ = ["DEFAULT_LOAD_FACTOR", "Move", "assign", "gpu_loads", "load_cap", "moves", "ranking", "score"]
