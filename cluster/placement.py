"""Spill-over and fail-over partners per GPU, NVLink peers first; where orphaned groups go. Pure.

A GPU's **spill-over** partners are its NVLink peers only (overflow batches read the reference caches over peer
access; over PCIe or the network a spill would cost more than it saves); its **overflow** peer is the first live
one of them (``overflow_peer``). Its **fail-over** partners are its NVLink
peers, then the other GPUs of its node, then GPUs of other nodes. Within a class the order is rotated per GPU
(GPU k's first peer is the next GPU of its island after k, cyclically; other nodes in a per-GPU hash order), so
the groups of different dead GPUs spread instead of all landing on the lowest-numbered survivor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cluster.sharding import DEFAULT_LOAD_FACTOR, load_cap, ranking, score


@dataclass(frozen=True, slots=True)
class GpuSite:
    """Where a worker runs: its node, its GPU index on that node and its NVLink island there (None: unknown)."""

    worker: str
    node: str
    gpu: int | None = None
    island: int | None = None


@dataclass(frozen=True, slots=True)
class Partners:
    spill: tuple[str, ...]  # NVLink peers, in order of preference
    failover: tuple[str, ...]  # NVLink peers, then same node, then other nodes


def _cyclic(site: GpuSite, others: Sequence[GpuSite]) -> list[GpuSite]:
    """Others on the same node ordered by GPU index, starting after ``site``'s index and wrapping around."""
    mine = site.gpu
    if mine is None:
        return sorted(others, key=lambda o: (o.gpu is None, o.gpu or 0, o.worker))
    big = 1 + max([mine, *(o.gpu for o in others if o.gpu is not None)])
    return sorted(others, key=lambda o: (o.gpu is None, ((o.gpu or 0) - mine) % big, o.worker))


def _is_peer(a: GpuSite, b: GpuSite) -> bool:
    return a.node == b.node and a.island is not None and a.island == b.island


def partners(sites: Sequence[GpuSite]) -> dict[str, Partners]:
    """worker -> its spill-over and fail-over partners (other workers only)."""
    names = [s.worker for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"worker names must be unique, got {names}")
    out: dict[str, Partners] = {}
    for s in sites:
        others = [o for o in sites if o.worker != s.worker]
        peers = _cyclic(s, [o for o in others if _is_peer(s, o)])
        local = _cyclic(s, [o for o in others if o.node == s.node and not _is_peer(s, o)])
        remote = sorted((o for o in others if o.node != s.node), key=lambda o: (-score(s.worker, o.worker), o.worker))
        spill = tuple(o.worker for o in peers)
        out[s.worker] = Partners(spill, spill + tuple(o.worker for o in [*local, *remote]))
    return out


def failover_targets(
    orphans: Mapping[str, float],
    loads: Mapping[str, float],
    live: Sequence[str],
    order: Sequence[str],
    total_load: float,
    load_factor: float = DEFAULT_LOAD_FACTOR,
) -> dict[str, str]:
    """Where each orphaned group goes when its GPU died.

    ``orphans``: group -> load; ``loads``: current load of each live worker (without the orphans); ``order``: the
    dead GPU's fail-over partners. A group takes the first live partner with room under the bounded-load cap over
    the live GPUs, then any live GPU in its rendezvous order with room, else the least loaded live GPU. Heavy
    groups first. Nothing else moves.
    """
    if not live:
        raise ValueError(f"no live GPU to take groups {sorted(orphans)}")
    cap = load_cap(total_load, len(live), load_factor)
    current = {w: float(loads.get(w, 0.0)) for w in live}
    preferred = [w for w in order if w in current]
    out: dict[str, str] = {}
    for gid in sorted(orphans, key=lambda g: (-orphans[g], g)):
        w = orphans[gid]
        candidates = preferred + [x for x in ranking(gid, live) if x not in preferred]
        choice = next((c for c in candidates if current[c] + w <= cap), None)
        if choice is None:
            choice = min(live, key=lambda x: (current[x], x))
        current[choice] += w
        out[gid] = choice
    return out


def spill_target(
    worker: str, spill: Sequence[str], utilization: Mapping[str, float], threshold: float = 0.8
) -> str | None:
    """The NVLink peer that should take ``worker``'s overflow batches: the first with utilization below
    ``threshold`` (0..1), or None (no peer has room, or the GPU has no NVLink peer: then it sheds load by
    dropping the oldest frames, as a single node does)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"spill threshold must be in (0, 1], got {threshold}")
    for peer in spill:
        if peer != worker and utilization.get(peer, 1.0) < threshold:
            return peer
    return None


def overflow_peer(worker: str, pts: Partners, alive: Callable[[str], bool], peer_only: bool = True) -> str | None:
    """Where ``worker`` sends its overflow batches (cluster.overflow): its first live NVLink peer; without
    ``peer_only``, when no NVLink peer is live, its first live fail-over partner (same node, then other nodes).
    None: no peer, overflow frames are dropped."""
    order = pts.spill if peer_only else (*pts.spill, *(w for w in pts.failover if w not in pts.spill))
    return next((w for w in order if w != worker and alive(w)), None)


def drop_pressure(before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]) -> float:
    """The share of a worker's frames dropped between two status polls, from each camera's cumulative
    (processed, dropped) counts; cameras that appeared in between count from zero, counters that went back
    (a restarted camera) count as fresh."""
    processed = dropped = 0
    for cam, (p1, d1) in after.items():
        p0, d0 = before.get(cam, (0, 0))
        if p1 < p0 or d1 < d0:
            p0 = d0 = 0
        processed += p1 - p0
        dropped += d1 - d0
    total = processed + dropped
    return dropped / total if total > 0 else 0.0


def spill_moves(
    pressure: Mapping[str, float],
    held: Mapping[str, Mapping[str, float]],
    spill: Mapping[str, Sequence[str]],
    saturated: float = 0.05,
    room: float = 0.01,
) -> list[tuple[str, str, str]]:
    """Group-level spill-over, NVLink peers only: (group, source, target) moves for this step.

    ``pressure``: each live worker's drop share over the last interval (0..1); ``held``: worker -> its groups and
    their loads; ``spill``: worker -> its NVLink peers in order of preference. A worker above ``saturated``
    hands its lightest group (never its only one) to its first peer at or below ``room``; one move per source
    and per target a step, most pressed sources first. GPUs without NVLink peers never spill (they shed load by
    dropping the oldest frames): over PCIe or the network the move would cost more than it saves.
    """
    if not 0 <= room < saturated <= 1:
        raise ValueError(f"need 0 <= room < saturated <= 1, got room {room} saturated {saturated}")
    taken: set[str] = set()
    out: list[tuple[str, str, str]] = []
    for source in sorted(pressure, key=lambda w: (-pressure[w], w)):
        if pressure[source] <= saturated or source in taken:
            continue
        groups = held.get(source, {})
        if len(groups) < 2:
            continue
        target = next((peer for peer in spill.get(source, ()) if peer != source and peer not in taken
                       and peer in pressure and pressure[peer] <= room), None)
        if target is None:
            continue
        gid = min(groups, key=lambda g: (groups[g], g))
        out.append((gid, source, target))
        taken.update((source, target))
    return out


def spill_may_return(
    spilled_at: float, now: float, hold_s: float, home_pressure: float | None, measured_at: float | None,
    calm: float,
) -> bool:
    """Whether a group spilled off its home at ``spilled_at`` may go back now (hysteresis): it stayed at least
    ``hold_s`` on the peer, and the home's drop share over a whole window that ended after the spill
    (``home_pressure``, measured at ``measured_at``) is at most ``calm``, below the spill bound."""
    if now - spilled_at < hold_s or home_pressure is None or measured_at is None:
        return False
    return measured_at > spilled_at and home_pressure <= calm


def spill_decay(factor: int, home_s: float, calm_s: float) -> int:
    """A group's spill hold factor after it stayed home ``home_s``: halved for every whole ``calm_s``, at least 1."""
    if calm_s <= 0:
        raise ValueError(f"spill calm period must be > 0, got {calm_s}")
    periods = int(max(0.0, home_s) // calm_s)
    return max(1, factor >> min(periods, 62))


def spill_backoff(
    factor: int, returned_at: float | None, now: float, window_s: float, calm_s: float, max_factor: int
) -> tuple[int, bool]:
    """(the hold factor, whether it is a cycle) of a group spilled at ``now``.

    ``factor``: the group's hold factor when it last came home, at ``returned_at`` (None: it never came back from a
    spill). The factor first decays for the time the group stayed home (``spill_decay``); a spill within
    ``window_s`` of the return closes a cycle (spill, return, spill again: the home is overloaded again as soon as
    the group is back) and doubles it, capped at ``max_factor``. The group then stays ``factor * spill_hold_s`` on
    the peer before it may return."""
    if max_factor < 1:
        raise ValueError(f"spill backoff cap must be >= 1, got {max_factor}")
    if returned_at is None:
        return min(max(1, factor), max_factor), False
    home_s = max(0.0, now - returned_at)
    decayed = min(spill_decay(factor, home_s, calm_s), max_factor)
    if home_s <= window_s:
        return min(2 * decayed, max_factor), True
    return decayed, False


__all__ = ["GpuSite", "Partners", "drop_pressure", "failover_targets", "overflow_peer", "partners", "spill_backoff",
           "spill_decay", "spill_may_return", "spill_moves", "spill_target"]
