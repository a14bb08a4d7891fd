"""Pure parts of the cluster layer: sharding, topology, placement, sequence leases (table-driven)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from cluster.placement import GpuSite, failover_targets, partners, spill_target
from cluster.sequence import Lease, LeaseLedger, LeaseState, SeqBook
from cluster.sharding import assign, gpu_loads, load_cap, moves, ranking
from cluster.topology import (
    check_matrix,
    describe,
    island_of,
    island_resources,
    islands_from_links,
    link_matrix_from_nvml,
    nvlink_peers,
    read_link_matrix,
)


def _groups(n: int, load: float = 1.0) -> dict[str, float]:
    return {f"g{i}": load for i in range(n)}


def _gpus(n: int) -> list[str]:
    return [f"gpu{i}" for i in range(n)]


# -- sharding ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_groups", "n_gpus", "moved_on_add", "to_new_gpu"),
    [
        # ideal: groups / (gpus + 1) move, all to the new GPU; a shrinking cap adds a few cascades
        (8, 2, 3, 3),
        (16, 4, 4, 4),
        (100, 4, 18, 18),
        (100, 8, 14, 11),
        (64, 8, 11, 9),
        (1000, 10, 79, 79),
    ],
)
def test_adding_a_gpu_moves_few_groups_and_loads_stay_bounded(
    n_groups: int, n_gpus: int, moved_on_add: int, to_new_gpu: int
) -> None:
    groups = _groups(n_groups)
    before = assign(groups, _gpus(n_gpus))
    after = assign(groups, _gpus(n_gpus + 1))
    moved = moves(before, after)
    assert len(moved) == moved_on_add
    assert sum(m.target == f"gpu{n_gpus}" for m in moved) == to_new_gpu
    assert moved_on_add <= math.ceil(1.6 * n_groups / (n_gpus + 1))
    for assignment, n in ((before, n_gpus), (after, n_gpus + 1)):
        cap = load_cap(float(n_groups), n)
        assert max(gpu_loads(assignment, groups, _gpus(n)).values()) <= cap
        assert set(assignment) == set(groups)  # every group placed exactly once (a dict: never split)


@pytest.mark.parametrize(("n_groups", "n_gpus"), [(8, 2), (20, 3), (100, 8)])
def test_removing_a_gpu_moves_mostly_its_own_groups(n_groups: int, n_gpus: int) -> None:
    groups = _groups(n_groups)
    before = assign(groups, _gpus(n_gpus))
    after = assign(groups, _gpus(n_gpus - 1))
    gone = f"gpu{n_gpus - 1}"
    own = sum(1 for g in before.values() if g == gone)
    moved = moves(before, after)
    assert all(m.target != gone for m in moved)
    assert {m.group for m in moved if m.source == gone} == {g for g, p in before.items() if p == gone}
    assert len(moved) <= own + max(2, n_groups // (2 * n_gpus))


@pytest.mark.parametrize(
    ("loads", "n_gpus", "load_factor", "cap"),
    [
        ({"a": 2.0, "b": 2.0, "c": 2.0, "d": 2.0}, 2, 1.25, 5.0),
        ({"a": 1.0, "b": 1.0, "c": 1.0}, 3, 1.0, 1.0),
        ({"a": 3.0, "b": 1.0, "c": 1.0, "d": 1.0}, 2, 1.0, 3.0),
    ],
)
def test_bounded_load_with_weights(loads: dict[str, float], n_gpus: int, load_factor: float, cap: float) -> None:
    a = assign(loads, _gpus(n_gpus), load_factor)
    assert load_cap(sum(loads.values()), n_gpus, load_factor) == cap
    assert max(gpu_loads(a, loads, _gpus(n_gpus)).values()) <= cap


def test_assignment_is_deterministic_and_independent_of_gpu_order() -> None:
    groups = _groups(50)
    assert assign(groups, _gpus(5)) == assign(groups, list(reversed(_gpus(5))))
    assert ranking("g1", _gpus(4)) == ranking("g1", list(reversed(_gpus(4))))


@pytest.mark.parametrize(
    ("groups", "gpus", "message"),
    [
        ({"a": 1.0}, [], "zero GPUs"),
        ({"a": 0.0}, ["x"], "group 'a' has load 0.0"),
        ({"a": 1.0}, ["x", "x"], "unique"),
    ],
)
def test_assign_rejects_bad_input(groups: dict[str, float], gpus: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign(groups, gpus)


# -- topology ----------------------------------------------------------------------------------------------------
def _all_to_all(n: int, links: int) -> list[list[int]]:
    return [[0 if i == j else links for j in range(n)] for i in range(n)]


def _blocks(sizes: list[int], links: int) -> list[list[int]]:
    n = sum(sizes)
    m = [[0] * n for _ in range(n)]
    start = 0
    for s in sizes:
        for i in range(start, start + s):
            for j in range(start, start + s):
                if i != j:
                    m[i][j] = links
        start += s
    return m


@pytest.mark.parametrize(
    ("matrix", "islands"),
    [
        (_all_to_all(8, 18), ((0, 1, 2, 3, 4, 5, 6, 7),)),  # HGX H100: NV18 all-to-all through NVSwitch
        (_blocks([4, 4], 12), ((0, 1, 2, 3), (4, 5, 6, 7))),  # two islands of 4
        (_all_to_all(4, 0), ((0,), (1,), (2,), (3,))),  # PCIe only: every GPU alone
        (_all_to_all(2, 18), ((0, 1),)),  # the 2x H200 box: NV18
        ([[0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 0], [0, 0, 0, 0]], ((0, 1, 2), (3,))),  # a chain, one direction given
        ([[0]], ((0,),)),
        ([], ()),
    ],
)
def test_islands_from_links(matrix: list[list[int]], islands: tuple[tuple[int, ...], ...]) -> None:
    assert islands_from_links(matrix) == islands


def test_island_helpers() -> None:
    islands = islands_from_links(_blocks([4, 4], 12))
    assert island_of(islands, 5) == 1
    assert island_of(islands, 9) is None
    assert nvlink_peers(islands, 2) == (0, 1, 3)
    assert island_resources(islands) == {"nvlink_island_0": 4.0, "nvlink_island_1": 4.0}
    assert island_resources(islands_from_links(_all_to_all(3, 0))) == {}
    text = describe(_all_to_all(2, 18))
    assert "NV18" in text and "X" in text


@pytest.mark.parametrize(
    ("matrix", "message"),
    [([[0, 1], [1]], "row 1 has 1 entries, expected 2"), ([[0, -1], [0, 0]], "GPU0->GPU1 is -1")],
)
def test_link_matrix_validation(matrix: list[list[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_matrix(matrix)


def test_read_link_matrix_never_raises() -> None:
    m = read_link_matrix()  # None without an NVIDIA driver (CI), the node's matrix with one
    assert m is None or all(len(row) == len(m) for row in m)


class FakeNvml:
    """Just enough of the pynvml API to describe a board (no NVIDIA driver exists on CI machines)."""

    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1
    NVML_P2P_CAPS_INDEX_NVLINK = 5
    NVML_P2P_STATUS_OK = 0

    class NVMLError(Exception):
        pass

    class Pci:
        def __init__(self, bus: str) -> None:
            self.busId = bus.encode()

    def __init__(self, n: int, links: dict[int, list[str]], p2p: set[tuple[int, int]]) -> None:
        self.buses = [f"00000000:{0x10 + i:02x}:00.0" for i in range(n)]
        self.links = links  # GPU -> the bus id at the far end of each active link
        self.p2p = p2p

    def nvmlDeviceGetCount(self) -> int:
        return len(self.buses)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetPciInfo(self, h: int) -> FakeNvml.Pci:
        return self.Pci(self.buses[h])

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= len(self.links.get(h, [])):
            raise self.NVMLError("not supported")
        return self.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> FakeNvml.Pci:
        return self.Pci(self.links[h][link])

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, cap: int) -> int:
        return 0 if (a, b) in self.p2p or (b, a) in self.p2p else 3


def test_nvml_direct_links_are_counted_per_pair() -> None:
    nv = FakeNvml(4, {}, set())
    bus = nv.buses
    nv.links = {0: [bus[1]] * 4, 1: [bus[0]] * 4, 2: [bus[3]] * 2, 3: [bus[2]] * 2}
    m = link_matrix_from_nvml(nv)
    assert m is not None and m[0][1] == 4 and m[2][3] == 2 and m[0][2] == 0
    assert islands_from_links(m) == ((0, 1), (2, 3))


def test_nvml_links_through_an_nvswitch_count_as_peers() -> None:
    switch = "00000000:c0:00.0"
    nv = FakeNvml(8, {g: [switch] * 18 for g in range(8)}, {(a, b) for a in range(8) for b in range(8) if a != b})
    m = link_matrix_from_nvml(nv)
    assert m is not None and all(m[i][j] == 18 for i in range(8) for j in range(8) if i != j)
    assert describe(m).splitlines()[1].split() == ["GPU0", "X", *["NV18"] * 7]


# -- placement ---------------------------------------------------------------------------------------------------
def _sites(islands: list[list[int]], node: str = "n0", start: int = 0) -> list[GpuSite]:
    out: list[GpuSite] = []
    for k, members in enumerate(islands):
        out.extend(GpuSite(f"w{g + start}", node, g, k) for g in members)
    return out


@pytest.mark.parametrize(
    ("sites", "worker", "spill", "failover_head"),
    [
        (_sites([[0, 1, 2, 3], [4, 5, 6, 7]]), "w1", ("w2", "w3", "w0"), ("w2", "w3", "w0", "w4")),
        (_sites([[0, 1, 2, 3], [4, 5, 6, 7]]), "w7", ("w4", "w5", "w6"), ("w4", "w5", "w6", "w0")),
        (_sites([[0], [1], [2]]), "w0", (), ("w1", "w2")),  # PCIe only: no spill partner
        (_sites([[0, 1]]) + _sites([[0, 1]], node="n1", start=10), "w0", ("w1",), ("w1",)),
    ],
)
def test_partners_prefer_nvlink_peers(
    sites: list[GpuSite], worker: str, spill: tuple[str, ...], failover_head: tuple[str, ...]
) -> None:
    p = partners(sites)[worker]
    assert p.spill == spill
    assert p.failover[: len(failover_head)] == failover_head
    assert len(p.failover) == len(sites) - 1 and worker not in p.failover


def test_partners_across_nodes_come_last() -> None:
    sites = _sites([[0, 1]]) + _sites([[0, 1]], node="n1", start=10)
    p = partners(sites)["w0"]
    assert p.failover[0] == "w1"
    assert set(p.failover[1:]) == {"w10", "w11"}


def test_dead_gpus_spread_over_their_islands() -> None:
    p = partners(_sites([[0, 1, 2, 3]]))
    assert Counter(p[w].failover[0] for w in ("w0", "w1", "w2", "w3")) == Counter({"w1": 1, "w2": 1, "w3": 1, "w0": 1})


@pytest.mark.parametrize(
    ("orphans", "loads", "live", "order", "total", "expected"),
    [
        # the first partner has room: everything goes there
        ({"a": 1.0, "b": 1.0}, {"w1": 1.0, "w2": 1.0}, ["w1", "w2"], ["w1", "w2"], 4.0, {"a": "w1", "b": "w1"}),
        # the peer is at the cap (ceil(1.25*8/2) = 5): the overflow goes elsewhere
        ({"a": 2.0, "b": 2.0}, {"w1": 2.0, "w2": 2.0}, ["w1", "w2"], ["w1"], 8.0, {"a": "w1", "b": "w2"}),
        # nobody has room: least loaded
        ({"a": 5.0}, {"w1": 3.0, "w2": 1.0}, ["w1", "w2"], ["w1"], 6.0, {"a": "w2"}),
    ],
)
def test_failover_targets(
    orphans: dict[str, float], loads: dict[str, float], live: list[str], order: list[str], total: float,
    expected: dict[str, str],
) -> None:
    assert failover_targets(orphans, loads, live, order, total) == expected


def test_failover_without_live_gpus_raises() -> None:
    with pytest.raises(ValueError, match="no live GPU"):
        failover_targets({"a": 1.0}, {}, [], [], 1.0)


def test_spill_target() -> None:
    assert spill_target("w0", ("w1", "w2"), {"w1": 0.95, "w2": 0.5}) == "w2"
    assert spill_target("w0", ("w1",), {"w1": 0.95}) is None
    assert spill_target("w0", (), {}) is None


# -- sequence leases ---------------------------------------------------------------------------------------------
def test_seq_book_numbers_fences_and_counts_overruns() -> None:
    book = SeqBook()
    book.grant(Lease("c", 10, 12))
    assert [book.take("c") for _ in range(3)] == [10, 11, 12]
    assert book.overruns == 1
    book.extend("c", 100)
    book.extend("c", 50)  # never lowers
    assert book.states() == (LeaseState("c", 13, 100),)
    assert book.fence("c") == LeaseState("c", 13, 100)
    assert book.take("c") is None and book.fenced == 1
    assert book.fence("c") is None
    with pytest.raises(ValueError, match="ceiling 5 <= start 5"):
        book.grant(Lease("c", 5, 5))


def test_ledger_graceful_failover_and_extension() -> None:
    led = LeaseLedger(1000)
    assert led.first("c") == Lease("c", 0, 1000)
    assert led.extension(LeaseState("c", 400, 1000)) is None  # less than half used
    assert led.extension(LeaseState("c", 600, 1000)) == 2000  # past half: one more block
    assert led.extension(LeaseState("c", 610, 1000)) == 2000  # granted, not yet seen by the worker
    assert led.graceful(LeaseState("c", 700, 2000)) == Lease("c", 700, 2000)  # exact continuation
    assert led.failover("c") == Lease("c", 2000, 3000)  # a jump to a multiple of the block
    assert led.failover("c") == Lease("c", 3000, 4000)
    with pytest.raises(KeyError, match="'d'"):
        led.failover("d")
    assert led.first_start(1_700_000_000.5) == 1_700_000_000_000
    assert led.first("e", 1234) == Lease("e", 2000, 3000)  # starts are aligned up


def test_ledger_adopts_a_running_workers_lease() -> None:
    led = LeaseLedger(100)
    led.adopt(LeaseState("c", 250, 300))
    assert led.failover("c") == Lease("c", 300, 400)
