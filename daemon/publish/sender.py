"""Ordered, never-losing delivery: one thread owns the order of everything sent to the broker.

Producers hand messages to `Delivery.enqueue` (non-blocking: a bounded wait at most). The sender thread
publishes them directly while the link is up and nothing older waits in the spool; otherwise it appends them
to the spool. After a (re)connection it first sends the session's birth messages, then replays the spool in
order, then goes back to direct sending. A message leaves memory or the spool only when the broker acked it
(QoS 1/2). Messages unacked when the link drops go back to the spool under their original order number, so
the replay keeps production order; QoS 1 may deliver some twice, never zero times.

Durable (write-ahead) mode: the memory queue is only a group-commit buffer. Each sender loop commits what
waits in memory to the spool (one transaction per batch, whatever the link does) and only then sends it, so a
process killed hard (SIGKILL, OOM) loses at most the messages accepted since the last commit (one loop, a few
ms); everything committed stays until the broker acked it and the next process replays it first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.publish.outbound import Link, OutMessage, SessionHooks
from daemon.publish.spool import DROP_RANK, Spool, SpoolRecord

log = logging.getLogger(__name__)
_BATCH = 512
BIRTH_KINDS = frozenset({"camera_state", "availability"})  # retained kinds every session's births send afresh


@dataclass(slots=True)
class DeliveryCounters:
    enqueued: int = 0
    published: int = 0
    acked: int = 0
    rejected_by_broker: int = 0
    spooled: int = 0
    replayed: int = 0
    requeued_after_drop: int = 0
    dropped_overflow: int = 0
    dropped_after_close: int = 0
    publish_errors: int = 0
    sessions: int = 0
    committed_batches: int = 0
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))


class Delivery:
    """The sender thread and its bounded in-memory queue."""

    def __init__(
        self,
        spool: Spool,
        link: Link,
        hooks: SessionHooks,
        max_inflight: int,
        max_pending: int,
        enqueue_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        durable: bool = False,
    ) -> None:
        self._spool = spool
        self._link = link
        self._hooks = hooks
        self._max_inflight = max_inflight
        self._max_pending = max_pending
        self._enqueue_timeout = enqueue_timeout_s
        self._clock = clock
        self._durable = durable
        self._cond = threading.Condition()
        self._pending: deque[OutMessage] = deque()
        self._events: deque[tuple[str, int, int, bool]] = deque()
        self._next_order = 0
        self._committed = 0  # durable: highest order committed to the spool (guarded by _cond)
        self._closed = False
        self._stop = False
        self._draining = False
        self._thread: threading.Thread | None = None
        # sender-thread state
        self._gen = -1
        self._online = False
        self._unacked: dict[int, tuple[OutMessage, bool]] = {}
        self._cursor = 0
        self._replay_until = 0  # durable: spool records up to here were there before this session (historical)
        # durable: unsent messages in order, each with whether it is committed to the spool (the spool's records
        # after _cursor; False only for a batch whose commit failed, sent without its net rather than lost)
        self._tail: deque[tuple[OutMessage, bool]] = deque()
        self._to_delete: list[int] = []
        self.counters = DeliveryCounters()

    # -- producer side ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._next_order = max(self._spool.last_order, self._spool.max_order())
        self._committed = self._next_order
        self._thread = threading.Thread(target=self._run, name="mqtt-send", daemon=True)
        self._thread.start()

    def enqueue(self, kind: str, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        with self._cond:
            if self._closed:
                self.counters.dropped_after_close += 1
                return
            if len(self._pending) >= self._max_pending:
                deadline = self._clock() + self._enqueue_timeout
                while len(self._pending) >= self._max_pending and not self._closed:
                    left = deadline - self._clock()
                    if left <= 0 or not self._cond.wait(left):
                        break
                if len(self._pending) >= self._max_pending:
                    self._drop_one_pending()
            self._next_order += 1
            self._pending.append(OutMessage(self._next_order, kind, topic, payload, qos, retain, self._clock()))
            self.counters.enqueued += 1
            self._cond.notify_all()

    def _drop_one_pending(self) -> None:
        for rank in sorted(set(DROP_RANK.values()), reverse=True):
            for i, m in enumerate(self._pending):
                if DROP_RANK.get(m.kind, 0) == rank:
                    del self._pending[i]
                    self.counters.dropped_overflow += 1
                    n = self.counters.dropped_overflow
                    if n & (n - 1) == 0:
                        log.warning("mqtt: memory queue full, dropped %d oldest messages so far", n)
                    return

    def wait_committed(self, timeout: float) -> bool:
        """Durable mode: wait until every message accepted so far is committed to the spool. False on timeout,
        when not durable, or once stopped (a message dropped from a full memory queue is never committed)."""
        deadline = self._clock() + timeout
        with self._cond:
            target = self._next_order
            while self._durable and self._committed < target and not self._stop:
                left = deadline - self._clock()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._durable and self._committed >= target

    # -- link events (called from paho's network thread) ------------------------------------------------------
    def link_up(self, generation: int) -> None:
        self._event("up", generation)

    def link_down(self, generation: int) -> None:
        self._event("down", generation)

    def acked(self, generation: int, mid: int, ok: bool) -> None:
        self._event("ack", generation, mid, ok)

    def rebirth(self) -> None:
        self._event("rebirth", 0)

    def _event(self, kind: str, generation: int, mid: int = 0, ok: bool = True) -> None:
        self._events.append((kind, generation, mid, ok))
        with self._cond:
            self._cond.notify_all()

    # -- stop -----------------------------------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing waits in memory and nothing is unacked (the spool may still hold messages when offline)."""
        with self._cond:
            return not self._pending and not self._unacked and (self._cursor >= self._spool.last_order)

    def close(self, timeout: float) -> bool:
        """Send what the link takes within timeout, then keep the rest in the spool. True when all was acked."""
        deadline = self._clock() + timeout
        with self._cond:
            self._closed = True
            self._draining = True
            self._cond.notify_all()
        while self._clock() < deadline and not self.idle() and self._online:
            time.sleep(0.01)
        clean = self.idle() and self._spool.counters.messages == 0
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(max(1.0, deadline - self._clock()))
        return clean

    @property
    def online(self) -> bool:
        return self._online

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- sender thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if not self._events and not self._work_ready() and not self._stop:
                        self._cond.wait(0.05)
                    stop = self._stop
                self._handle_events()
                if stop:
                    break
                self._route_pending()
                self._drain_spool()
                self._flush_deletes()
        except Exception:
            log.exception("mqtt sender thread failed; messages stay in the spool")
        finally:
            self._shutdown_spool()

    def _work_ready(self) -> bool:
        room = len(self._unacked) < self._max_inflight
        if self._pending and (self._durable or not self._online or room):
            return True
        return self._online and self._cursor < self._spool.last_order and room

    def _handle_events(self) -> None:
        while self._events:
            kind, gen, mid, ok = self._events.popleft()
            if kind == "ack":
                self._on_ack(gen, mid, ok)
            elif kind == "down":
                self._on_down(gen)
            elif kind == "up":
                self._on_up(gen)
            elif kind == "rebirth" and self._online:
                self._send_births()

    def _on_ack(self, gen: int, mid: int, ok: bool) -> None:
        if gen != self._gen:
            return
        entry = self._unacked.pop(mid, None)
        if entry is None:
            return
        msg, from_spool = entry
        if from_spool:
            self._to_delete.append(msg.order)
        if ok:
            self.counters.acked += 1
            if msg.enqueued > 0:
                self.counters.latencies_s.append(self._clock() - msg.enqueued)
        else:
            self.counters.rejected_by_broker += 1
            log.warning("mqtt: broker refused message %d on %s", msg.order, msg.topic)
        if len(self._unacked) < self._max_inflight:
            with self._cond:
                self._cond.notify_all()

    def _on_down(self, gen: int) -> None:
        if gen != self._gen or not self._online:
            return
        self._online = False
        loose = [m for m, committed in self._tail if not committed]  # the committed: replay reads them back
        self._tail.clear()
        self._flush_deletes()
        direct = sorted([m for m, from_spool in self._unacked.values() if not from_spool] + loose,
                        key=lambda m: m.order)
        n = len(self._unacked)
        self.counters.requeued_after_drop += n
        self._unacked.clear()
        self._to_spool(direct)
        log.info("mqtt: link down; %d unacked messages kept for replay", n)

    def _on_up(self, gen: int) -> None:
        if self._online:
            self._on_down(self._gen)
        self._gen = gen
        self._online = True
        self._unacked.clear()
        self._cursor = 0
        self._replay_until = self._spool.last_order
        self.counters.sessions += 1
        self._send_births()
        if self._spool.counters.messages:
            log.info("mqtt: link up; replaying %d spooled messages", self._spool.counters.messages)

    def _send_births(self) -> None:
        for m in self._hooks.births():
            self._link.try_publish(self._gen, m)

    def _route_pending(self) -> None:
        if self._durable:
            self._commit_pending()
            return
        direct = self._online and self._cursor >= self._spool.last_order
        while True:
            with self._cond:
                if not self._pending:
                    return
                if direct and len(self._unacked) >= self._max_inflight:
                    return
                n = self._max_inflight - len(self._unacked) if direct else _BATCH
                take = [self._pending.popleft() for _ in range(min(n, len(self._pending)))]
                self._cond.notify_all()
            if not direct:
                self._to_spool(take)
                continue
            for i, m in enumerate(take):
                if not self._send(m, from_spool=False, replay=False):
                    self._to_spool(take[i:])  # the link went down under us: keep order through the spool
                    return

    def _commit_pending(self) -> None:
        """Durable: what waits in memory goes to the spool (one transaction per batch) before any of it is sent.
        While the link is up and nothing older waits, the batch also joins the in-memory tail sent from here."""
        while True:
            with self._cond:
                take = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
                if take:
                    self._cond.notify_all()
            if not take:
                return
            caught_up = self._online and (
                self._tail[-1][0].order >= self._spool.last_order if self._tail
                else self._cursor >= self._spool.last_order
            )
            committed = self._to_spool(take)
            if committed:
                self.counters.committed_batches += 1
                with self._cond:
                    self._committed = take[-1].order
                    self._cond.notify_all()
            if caught_up and committed:
                if len(self._tail) + len(take) <= self._max_pending:  # else read back from the spool later
                    self._tail.extend((m, True) for m in take)
            elif caught_up:  # the spool failed: sent without its net rather than lost, after what waits before it
                self._tail.extend((m, False) for m in take)

    def _send_tail(self) -> None:
        while self._tail and self._online and len(self._unacked) < self._max_inflight:
            m, committed = self._tail[0]
            if not self._send(m, from_spool=committed, replay=False):
                return
            self._tail.popleft()
            self._cursor = m.order

    def _drain_spool(self) -> None:
        self._send_tail()
        while self._online and not self._tail and self._cursor < self._spool.last_order:
            room = self._max_inflight - len(self._unacked)
            if room <= 0:
                return
            batch = self._spool.read_after(self._cursor, min(room, _BATCH))
            if not batch:
                self._cursor = self._spool.last_order
                return
            for r in batch:
                replay = not self._durable or r.order <= self._replay_until
                # a replayed camera state is history: this session's births already set the retained value, which
                # an older state (of a killed run, or from before an outage) must not overwrite
                retain = r.retain and not (replay and r.kind in BIRTH_KINDS)
                msg = OutMessage(r.order, r.kind, r.topic, r.payload, r.qos, retain)
                if not self._send(msg, from_spool=True, replay=replay):
                    return
                self._cursor = r.order
                self.counters.replayed += 1

    def _send(self, msg: OutMessage, from_spool: bool, replay: bool) -> bool:
        try:
            extra, wire = self._hooks.prepare(msg, replay=replay)
            for m in extra:
                self._link.try_publish(self._gen, m)
            if wire is None:
                if from_spool:
                    self._to_delete.append(msg.order)
                return True
            mid = self._link.try_publish(self._gen, wire)
        except Exception:
            self.counters.publish_errors += 1
            log.exception("mqtt: publishing message %d on %s failed; dropped", msg.order, msg.topic)
            if from_spool:
                self._to_delete.append(msg.order)
            return True
        if mid is None:
            return False
        self.counters.published += 1
        if msg.qos == 0:
            if from_spool:
                self._to_delete.append(msg.order)
        else:
            self._unacked[mid] = (msg, from_spool)
        return True

    def _to_spool(self, msgs: list[OutMessage]) -> bool:
        if not msgs:
            return True
        recs = [SpoolRecord(m.order, m.kind, m.topic, m.payload, m.qos, m.retain) for m in msgs]
        try:
            self._spool.append(recs)
            self.counters.spooled += len(recs)
        except Exception:
            self.counters.publish_errors += len(recs)
            log.exception("mqtt: spooling %d messages failed; they are lost unless sent now", len(recs))
            return False
        return True

    def _flush_deletes(self) -> None:
        if self._to_delete:
            batch, self._to_delete = self._to_delete, []
            try:
                self._spool.delete(batch)
            except Exception:
                log.exception("mqtt: deleting %d acked messages from the spool failed", len(batch))

    def _shutdown_spool(self) -> None:
        """Last act of the sender thread: everything not acked goes to the spool."""
        self._flush_deletes()
        loose = [m for m, committed in self._tail if not committed]
        self._tail.clear()
        direct = sorted([m for m, from_spool in self._unacked.values() if not from_spool] + loose,
                        key=lambda m: m.order)
        self._unacked.clear()
        with self._cond:
            rest = list(self._pending)
            self._pending.clear()
        self._to_spool(direct + rest)
        self._online = False
