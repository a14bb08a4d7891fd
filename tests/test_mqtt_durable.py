"""Durable (write-ahead) delivery: every message is committed to the spool before it is sent and stays there
until the broker acked it; a publisher killed with SIGKILL loses nothing committed, the next one replays it first.

Sender units drive `Delivery` through its Link protocol with a link the test acks by hand; the spool is the real
SQLite file, read back through a second connection (what another process would see after a kill). The
end-to-end test kills a real publisher process while a real mosquitto is paused (SIGSTOP: messages held unacked).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from mosquitto import Broker, Collector

from daemon.config.mqtt import MqttConfig
from daemon.publish.outbound import OutMessage
from daemon.publish.sender import Delivery
from daemon.publish.spool import Spool, SpoolError, SpoolRecord


class HandLink:
    """A link the test controls: records what was published (and whether it was committed at that moment)."""

    def __init__(self, spool_path: Path) -> None:
        self._db = sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True, check_same_thread=False)
        self.lock = threading.Lock()
        self.sent: list[tuple[int, int, bool]] = []  # (mid, order, committed when sent)
        self.by_mid: dict[int, OutMessage] = {}
        self._mid = 0

    def try_publish(self, generation: int, msg: OutMessage) -> int | None:
        committed = self._db.execute("SELECT 1 FROM messages WHERE ord = ?", (msg.order,)).fetchone() is not None
        with self.lock:
            self._mid += 1
            self.sent.append((self._mid, msg.order, committed))
            self.by_mid[self._mid] = msg
            return self._mid if msg.qos else 0

    def orders(self) -> list[int]:
        with self.lock:
            return [o for _m, o, _c in self.sent]


class Hooks:
    def __init__(self) -> None:
        self.replay_flags: dict[int, bool] = {}

    def births(self) -> list[OutMessage]:
        return []

    def prepare(self, msg: OutMessage, replay: bool) -> tuple[list[OutMessage], OutMessage | None]:
        self.replay_flags[msg.order] = replay
        return [], msg


def _stored(path: Path) -> list[int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [int(r[0]) for r in db.execute("SELECT ord FROM messages ORDER BY ord")]
    finally:
        db.close()


def _until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture()
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.sqlite", 100_000, 1 << 30)
    s.open()
    yield s
    s.close()


def _delivery(spool: Spool, link: HandLink, hooks: Hooks, durable: bool = True, inflight: int = 10) -> Delivery:
    return Delivery(spool, link, hooks, max_inflight=inflight, max_pending=10_000, enqueue_timeout_s=0.1,
                    durable=durable)


def _enqueue(d: Delivery, first: int, n: int) -> None:
    for i in range(first, first + n):
        d.enqueue("detections", "t/cam1/detections", json.dumps({"seq": i}).encode(), 1, False)


def test_committed_before_sent_and_kept_until_acked(spool: Spool) -> None:
    link, hooks = HandLink(spool.path), Hooks()
    d = _delivery(spool, link, hooks, inflight=10)
    d.start()
    d.link_up(1)
    _enqueue(d, 0, 50)
    assert d.wait_committed(5)
    assert _stored(spool.path) == list(range(1, 51))  # all 50 committed although only 10 may be in flight
    assert _until(lambda: len(link.sent) == 10)
    assert all(committed for _m, _o, committed in link.sent)
    for mid, _o, _c in list(link.sent[:4]):
        d.acked(1, mid, True)
    assert _until(lambda: _stored(spool.path) == list(range(5, 51)) and len(link.sent) == 14)
    assert all(committed for _m, _o, committed in link.sent)
    assert link.orders() == list(range(1, 15)) and not any(hooks.replay_flags.values())  # live, not historical
    d.close(0.2)


def test_one_transaction_per_batch_not_per_message(spool: Spool) -> None:
    d = _delivery(spool, HandLink(spool.path), Hooks())
    d.start()
    _enqueue(d, 0, 2000)  # a burst, as the pipeline publishes a batch of frames
    assert d.wait_committed(5)
    assert 4 <= d.counters.committed_batches <= 2000 // 8  # at most 512 per transaction, many per transaction
    assert _stored(spool.path) == list(range(1, 2001))
    d.close(0.2)


def test_offline_durable_commits_everything(spool: Spool) -> None:
    link = HandLink(spool.path)
    d = _delivery(spool, link, Hooks())
    d.start()  # the link never comes up
    _enqueue(d, 0, 300)
    assert d.wait_committed(5)
    assert len(_stored(spool.path)) == 300 and not link.sent
    d.close(0.1)


def test_not_durable_keeps_memory_only_while_online(spool: Spool) -> None:
    link = HandLink(spool.path)
    d = _delivery(spool, link, Hooks(), durable=False, inflight=10)
    d.start()
    d.link_up(1)
    _enqueue(d, 0, 50)
    assert _until(lambda: len(link.sent) == 10)
    assert not d.wait_committed(0.05)
    assert _stored(spool.path) == [] and not any(c for _m, _o, c in link.sent)  # what a kill would lose
    d.close(0.1)
    assert len(_stored(spool.path)) == 50  # a clean stop still keeps them


def test_leftovers_replay_first_in_order_then_new_messages(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    old = Spool(path, 1000, 1 << 20)
    old.open()
    old.append([SpoolRecord(o, "detections", "t/cam1/detections", b"{}", 1, False) for o in (3, 4, 7, 8)])
    old.close()  # what a killed process left: committed, never acked
    s = Spool(path, 1000, 1 << 20)
    s.open()
    link, hooks = HandLink(path), Hooks()
    d = _delivery(s, link, hooks, inflight=100)
    d.start()
    _enqueue(d, 0, 3)  # new messages accepted before the broker is reachable
    assert d.wait_committed(5)
    d.link_up(1)
    assert _until(lambda: len(link.sent) == 7)
    assert link.orders() == [3, 4, 7, 8, 9, 10, 11]
    assert hooks.replay_flags == {3: True, 4: True, 7: True, 8: True, 9: True, 10: True, 11: True}
    _enqueue(d, 3, 2)
    assert _until(lambda: len(link.sent) == 9)
    assert link.orders()[-2:] == [12, 13] and not hooks.replay_flags[12]
    for mid in list(link.by_mid):
        d.acked(1, mid, True)
    assert _until(lambda: _stored(path) == [])
    d.close(0.5)
    s.close()


def test_a_killed_runs_camera_state_replays_without_retain_after_this_runs_births(tmp_path: Path) -> None:
    """The retained camera state is what the births of this session set; a state a killed run left in the spool
    is replayed as history (not retained), so it cannot overwrite the current one on the broker."""
    path = tmp_path / "spool.sqlite"
    old = Spool(path, 1000, 1 << 20)
    old.open()
    old.append([SpoolRecord(5, "camera_state", "t/cam1/state", b'{"state": "offline"}', 1, True),
                SpoolRecord(6, "detections", "t/cam1/detections", b"{}", 1, False)])
    old.close()
    s = Spool(path, 1000, 1 << 20)
    s.open()
    link, hooks = HandLink(path), Hooks()
    d = _delivery(s, link, hooks, inflight=100)
    d.start()
    d.link_up(1)
    assert _until(lambda: len(link.sent) == 2)
    sent = {m.order: m for m in link.by_mid.values()}
    assert sent[5].kind == "camera_state" and not sent[5].retain
    d.close(0.5)
    s.close()


def test_link_drop_replays_unacked_from_the_spool(spool: Spool) -> None:
    link, hooks = HandLink(spool.path), Hooks()
    d = _delivery(spool, link, hooks, inflight=5)
    d.start()
    d.link_up(1)
    _enqueue(d, 0, 8)
    assert _until(lambda: len(link.sent) == 5)
    d.acked(1, link.sent[0][0], True)
    assert _until(lambda: len(link.sent) == 6)
    d.link_down(1)
    d.link_up(2)
    assert _until(lambda: len(link.sent) == 6 + 5)  # the window again
    for mid, _o, _c in list(link.sent[6:]):
        d.acked(2, mid, True)
    assert _until(lambda: len(link.sent) == 6 + 7)
    assert link.orders()[6:] == [2, 3, 4, 5, 6, 7, 8]  # in order, from the spool, message 1 was acked
    assert all(hooks.replay_flags[o] for o in (2, 3, 4, 5, 6, 7, 8))
    d.close(0.1)


def test_backlog_beyond_the_memory_tail_is_read_back_in_order(spool: Spool) -> None:
    link = HandLink(spool.path)
    d = Delivery(spool, link, Hooks(), max_inflight=7, max_pending=100, enqueue_timeout_s=0.1, durable=True)
    d.start()
    d.link_up(1)
    for first in range(0, 600, 50):  # bursts: the in-memory tail keeps at most max_pending, the rest is re-read
        _enqueue(d, first, 50)
        assert d.wait_committed(5)
    acked: set[int] = set()
    deadline = time.monotonic() + 10
    while len(acked) < 600 and time.monotonic() < deadline:
        with link.lock:
            todo = [mid for mid, _o, _c in link.sent if mid not in acked]
        for mid in todo:
            d.acked(1, mid, True)
            acked.add(mid)
        time.sleep(0.002)
    assert link.orders() == list(range(1, 601)) and all(c for _m, _o, c in link.sent)
    assert _until(lambda: _stored(spool.path) == [])
    assert d.counters.replayed > 0  # some came back from SQLite
    d.close(0.2)


class FailingSpool(Spool):
    """The real SQLite spool whose next append fails (a full disk, an I/O error) when armed."""

    fail_next = False

    def append(self, records: Sequence[SpoolRecord]) -> int:
        if self.fail_next:
            self.fail_next = False
            raise SpoolError("disk full (injected)")
        return super().append(records)


def _failing_delivery(tmp_path: Path, inflight: int, first: int) -> tuple[FailingSpool, HandLink, Delivery]:
    """A live delivery that committed ``first`` messages (``inflight`` of them sent), then failed to commit 2."""
    spool = FailingSpool(tmp_path / "spool.sqlite", 100_000, 1 << 30)
    spool.open()
    link = HandLink(spool.path)
    d = _delivery(spool, link, Hooks(), inflight=inflight)
    d.start()
    d.link_up(1)
    _enqueue(d, 0, first)
    assert d.wait_committed(5) and _until(lambda: len(link.sent) == inflight)
    spool.fail_next = True
    _enqueue(d, first, 2)
    assert _until(lambda: d.counters.publish_errors == 2)
    return spool, link, d


def test_a_batch_whose_commit_failed_goes_out_after_the_older_unsent_ones(tmp_path: Path) -> None:
    # 1-6 committed, 1-3 in flight, 4-6 in the memory tail; 7-8 go without their net, but not ahead of 4-6
    spool, link, d = _failing_delivery(tmp_path, inflight=3, first=6)
    acked: set[int] = set()
    deadline = time.monotonic() + 5
    while len(link.sent) < 8 and time.monotonic() < deadline:
        with link.lock:
            todo = [mid for mid, _o, _c in link.sent if mid not in acked]
        for mid in todo:
            d.acked(1, mid, True)
            acked.add(mid)
        time.sleep(0.002)
    assert link.orders() == list(range(1, 9))
    assert [c for _m, _o, c in link.sent] == [True] * 6 + [False] * 2
    d.link_down(1)  # nothing of 7-8 is lost when the link drops before their acks: they go to the spool
    d.close(0.2)
    spool.close()


def test_an_uncommitted_batch_unsent_when_the_link_drops_is_spooled_then(tmp_path: Path) -> None:
    spool, _link, d = _failing_delivery(tmp_path, inflight=2, first=4)  # 5-6 uncommitted, behind 3-4 in the tail
    d.link_down(1)
    assert _until(lambda: _stored(spool.path) == [1, 2, 3, 4, 5, 6])  # the unacked, the tail and the loose
    d.close(0.2)
    spool.close()


def test_config_default_is_durable() -> None:
    assert MqttConfig().durable is True and MqttConfig().spool.fsync is False
    assert MqttConfig.model_validate({"durable": False}).durable is False


# -- a real publisher process, SIGKILLed while the broker holds its messages unacked --------------------------
NODE = {"site": "plant", "area": "smt", "line": "l4", "node": "box9"}
ROOT = "plant/smt/l4/deltayolo/box9"
CAMERAS = ("cam0", "cam1")
_CHILD = """
import json, sys
from types import SimpleNamespace
sys.path.insert(0, sys.argv[3])
from mosquitto import make_result
from daemon.config.mqtt import MqttConfig
from daemon.publish.mqtt import MqttPublisher
pub = MqttPublisher(MqttConfig.model_validate(json.loads(sys.argv[1])), SimpleNamespace(**json.loads(sys.argv[2])))
pub.start()
for line in sys.stdin:
    first, n = map(int, line.split())
    for seq in range(first, first + n):
        for cam in ("cam0", "cam1"):
            pub.publish_result(make_result(cam, seq, boxes=seq % 3))
    print("committed" if pub.sync(5) else "not committed", flush=True)
"""


def _publisher_process(broker: Broker, spool: Path, durable: bool) -> subprocess.Popen[str]:
    cfg = {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5,
           "durable": durable, "max_inflight": 20, "commands": {"enabled": False}, "spool": {"path": str(spool)}}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg), json.dumps(NODE), str(root / "tests")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _publish(proc: subprocess.Popen[str], first: int, n: int) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{first} {n}\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _seqs(col: Collector, cam: str) -> list[int]:
    return [json.loads(p)["seq"] for p in col.on(f"/{cam}/detections")]


def test_killed_publisher_loses_nothing_committed(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    col = Collector(broker, [f"{ROOT}/+/detections"], client_id="durable-collector").start()
    spool = tmp_path / "spool.sqlite"
    proc = _publisher_process(broker, spool, durable=True)
    proc2: subprocess.Popen[str] | None = None
    try:
        assert _publish(proc, 0, 50) == "committed"
        assert col.wait_for(lambda: all(len(set(_seqs(col, c))) == 50 for c in CAMERAS), 10)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)  # the broker stops reading and acking: messages stay unacked
        try:
            assert _publish(proc, 50, 300) == "committed"
            with pytest.raises(SpoolError, match="in use by another process"):
                Spool(spool, 100, 1 << 20).open()
            proc.kill()
            proc.wait(5)
            held = len(_stored(spool))
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        assert held >= 2 * 300  # everything not acked when it was killed is in the spool
        proc2 = _publisher_process(broker, spool, durable=True)  # the kernel released the dead process's lock
        assert _publish(proc2, 350, 50) == "committed"
        assert col.wait_for(lambda: all(set(_seqs(col, c)) == set(range(400)) for c in CAMERAS), 15), (
            {c: sorted(set(range(400)) - set(_seqs(col, c)))[:10] for c in CAMERAS})
        for cam in CAMERAS:
            seqs = _seqs(col, cam)
            first_seen = list(dict.fromkeys(seqs))
            assert first_seen == sorted(first_seen), f"{cam}: leftovers were not replayed before new messages"
        assert col.wait_for(lambda: _stored(spool) == [], 5)
    finally:
        for p in (proc, proc2):
            if p is not None:
                p.kill()
                p.wait(5)
        col.stop()
        broker.stop()
