"""Which GPUs of a node are NVLink peers: NVML link matrix -> NVLink islands.

``read_link_matrix()`` asks NVML (module ``pynvml`` of the ``nvidia-ml-py`` package) how many active NVLinks join
each pair of GPUs; it returns None where NVML is missing (no driver, CPU box). Through an NVSwitch a link's remote
end is the switch, not a GPU: a pair that NVML reports NVLink-P2P capable then counts the smaller of the two
GPUs' active link counts (what ``nvidia-smi topo -m`` shows as NV18 on an HGX H100). ``islands_from_links`` is the
pure part: connected components of the "shares an NVLink" graph; a GPU with no NVLink is an island of one.
Islands can be registered with Ray as custom resources (``island_resources``) so deployments may ask for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

LinkMatrix = tuple[tuple[int, ...], ...]
Islands = tuple[tuple[int, ...], ...]
ISLAND_RESOURCE_PREFIX = "nvlink_island_"


def check_matrix(links: Sequence[Sequence[int]]) -> LinkMatrix:
    """A square matrix of non-negative link counts, made symmetric (max of both directions), zero diagonal."""
    n = len(links)
    for i, row in enumerate(links):
        if len(row) != n:
            raise ValueError(f"link matrix row {i} has {len(row)} entries, expected {n} (one per GPU)")
        for j, v in enumerate(row):
            if v < 0:
                raise ValueError(f"link count GPU{i}->GPU{j} is {v}; counts must be >= 0")
    return tuple(
        tuple(0 if i == j else max(int(links[i][j]), int(links[j][i])) for j in range(n)) for i in range(n)
    )


def islands_from_links(links: Sequence[Sequence[int]]) -> Islands:
    """GPU indexes grouped into NVLink islands (connected components), each sorted, islands by first GPU."""
    m = check_matrix(links)
    n = len(m)
    seen: set[int] = set()
    out: list[tuple[int, ...]] = []
    for start in range(n):
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            g = stack.pop()
            if g in comp:
                continue
            comp.add(g)
            stack.extend(j for j in range(n) if m[g][j] > 0 and j not in comp)
        seen |= comp
        out.append(tuple(sorted(comp)))
    return tuple(out)


def island_of(islands: Islands, gpu: int) -> int | None:
    """Index of the island holding ``gpu`` (None if the GPU is not listed)."""
    for k, members in enumerate(islands):
        if gpu in members:
            return k
    return None


def nvlink_peers(islands: Islands, gpu: int) -> tuple[int, ...]:
    """The other GPUs of ``gpu``'s island."""
    k = island_of(islands, gpu)
    return () if k is None else tuple(g for g in islands[k] if g != gpu)


def island_resources(islands: Islands, prefix: str = ISLAND_RESOURCE_PREFIX) -> dict[str, float]:
    """Ray custom resources of one node: ``{prefix}{k}: number of GPUs in island k`` (NVLink islands only)."""
    return {f"{prefix}{k}": float(len(members)) for k, members in enumerate(islands) if len(members) > 1}


def describe(links: Sequence[Sequence[int]]) -> str:
    """A matrix like ``nvidia-smi topo -m`` prints it (NV# for NVLink pairs, '-' otherwise, X on the diagonal)."""
    m = check_matrix(links)
    n = len(m)
    head = "      " + "".join(f"GPU{j:<5}" for j in range(n))
    rows = [head.rstrip()]
    for i in range(n):
        cells = ["X" if i == j else (f"NV{m[i][j]}" if m[i][j] else "-") for j in range(n)]
        rows.append(f"GPU{i:<3}" + "".join(f"{c:<8}" for c in cells).rstrip())
    return "\n".join(rows)


def _bus_id(pci: Any) -> str:
    raw = pci.busId
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return text.strip().lower()[-12:]  # "00000000:18:00.0" and "0000:18:00.0" name the same device


def read_link_matrix() -> LinkMatrix | None:
    """NVLink counts between this node's GPUs from NVML; None without NVML or GPUs."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.info("NVML not available (%s): no NVLink topology", exc)
        return None
    try:
        return link_matrix_from_nvml(pynvml)
    except pynvml.NVMLError as exc:
        log.warning("reading the NVLink topology failed: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            log.debug("nvmlShutdown failed", exc_info=True)


def link_matrix_from_nvml(nv: Any) -> LinkMatrix | None:
    """The link matrix through an initialized NVML binding ``nv`` (the ``pynvml`` module)."""
    n = int(nv.nvmlDeviceGetCount())
    if n == 0:
        return None
    handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
    index_of = {_bus_id(nv.nvmlDeviceGetPciInfo(h)): i for i, h in enumerate(handles)}
    counts = [[0] * n for _ in range(n)]
    switch_links = [0] * n
    for i, h in enumerate(handles):
        for link in range(int(nv.NVML_NVLINK_MAX_LINKS)):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                    continue
                remote = _bus_id(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link))
            except nv.NVMLError:
                continue  # link not present / not supported on this board
            j = index_of.get(remote)
            if j is None:
                switch_links[i] += 1
            elif j != i:
                counts[i][j] += 1
    for i in range(n):
        for j in range(n):
            if i != j and counts[i][j] == 0 and switch_links[i] and _p2p_nvlink(nv, handles[i], handles[j]):
                counts[i][j] = max(1, min(switch_links[i], switch_links[j]))
    return check_matrix(counts)


def _p2p_nvlink(nv: Any, a: Any, b: Any) -> bool:
    try:
        return bool(nv.nvmlDeviceGetP2PStatus(a, b, nv.NVML_P2P_CAPS_INDEX_NVLINK) == nv.NVML_P2P_STATUS_OK)
    except nv.NVMLError:
        return False


def read_islands() -> Islands | None:
    """This node's NVLink islands, or None without NVML."""
    m = read_link_matrix()
    return None if m is None else islands_from_links(m)


__all__ = [
    "ISLAND_RESOURCE_PREFIX", "Islands", "LinkMatrix", "check_matrix", "describe", "island_of", "island_resources",
    "islands_from_links", "link_matrix_from_nvml", "nvlink_peers", "read_islands", "read_link_matrix",
]
