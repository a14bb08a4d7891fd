"""Store-and-forward spool: a bounded, ordered, on-disk queue of MQTT messages (SQLite in WAL mode).

Messages are keyed by a global order number given when they were produced, so whatever the route (sent
directly, spooled during an outage, put back after a lost connection) a replay is in production order.
When full, the policy drops by rank: oldest detections first, then frame errors, then stats; state messages
(rank 0) are never dropped. One process at a time: a lock file next to the database says who owns it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

DROP_RANK: Mapping[str, int] = {"detections": 3, "frame_error": 2, "stats": 1}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    ord INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    rank INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_rank ON messages (rank, ord);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SpoolError(RuntimeError):
    """The spool cannot be opened (in use by another process, unwritable folder...)."""


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    order: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class SpoolCounters:
    messages: int = 0
    bytes: int = 0
    appended: int = 0
    deleted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    recovered_corrupt: int = 0


def default_spool_path(node: str, environ: Mapping[str, str]) -> Path:
    """$STATE_DIRECTORY (systemd StateDirectory=) or $XDG_STATE_HOME/deltayolo or ~/.local/state/deltayolo."""
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        base = Path(state)
    elif environ.get("XDG_STATE_HOME"):
        base = Path(environ["XDG_STATE_HOME"]) / "deltayolo"
    else:
        base = Path.home() / ".local" / "state" / "deltayolo"
    return base / f"mqtt-spool-{node}.sqlite"


class Spool:
    """Bounded ordered message store. Thread-safe; every call is one short transaction."""

    def __init__(
        self,
        path: Path,
        max_messages: int,
        max_bytes: int,
        on_full: Literal["drop_oldest", "drop_newest"] = "drop_oldest",
        fsync: bool = False,
    ) -> None:
        self.path = path
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._on_full = on_full
        self._fsync = fsync
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self.counters = SpoolCounters()
        self.last_order = 0

    # -- open / close ---------------------------------------------------------------------------------------
    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._db = self._open_db()
        except BaseException:
            self.close()  # releases the lock: a failed open must not keep the next attempt out
            raise
        row = self._db.execute("SELECT count(*), coalesce(sum(length(payload)), 0), coalesce(max(ord), 0) "
                               "FROM messages").fetchone()
        self.counters.messages, self.counters.bytes, self.last_order = int(row[0]), int(row[1]), int(row[2])
        if self.counters.messages:
            log.info("spool %s holds %d messages (%d bytes) from before", self.path, row[0], row[1])

    def _open_db(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("spool %s is unreadable (%s); moved aside to %s, starting empty", self.path, exc, aside)
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.counters.recovered_corrupt += 1
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":  # e.g. a network file system: keep it local
                log.warning("spool %s: SQLite refused WAL mode (journal_mode=%s); slower, and unsafe on a network "
                            "file system", self.path, None if mode is None else mode[0])
            db.execute(f"PRAGMA synchronous={'FULL' if self._fsync else 'NORMAL'}")
            db.executescript(_SCHEMA)
            db.execute("SELECT count(*) FROM messages").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool {self.path} is in use by another process (lock {lock_path})") from None
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error as exc:
                    log.warning("spool checkpoint failed: %s", exc)
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"spool {self.path} is not open")
        return self._db

    # -- messages -------------------------------------------------------------------------------------------
    def append(self, records: Sequence[SpoolRecord]) -> int:
        """Store records (any order numbers, unique); returns how many were dropped to respect the bounds."""
        if not records:
            return 0
        with self._lock:
            db = self._conn()
            new_bytes = sum(len(r.payload) for r in records)
            db.execute("BEGIN IMMEDIATE")
            try:
                dropped, keep = self._make_room(db, records, new_bytes)
                rows = [(r.order, r.kind, DROP_RANK.get(r.kind, 0), r.topic, r.payload, r.qos, int(r.retain))
                        for r in keep]
                before = db.total_changes
                db.executemany("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                inserted = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.counters.messages += inserted
            self.counters.bytes += sum(len(r.payload) for r in keep) if inserted == len(keep) else 0
            if inserted != len(keep):
                self._recount(db)
            self.counters.appended += inserted
            self.last_order = max(self.last_order, max(r.order for r in keep)) if keep else self.last_order
            return dropped

    def _make_room(
        self, db: sqlite3.Connection, records: Sequence[SpoolRecord], new_bytes: int
    ) -> tuple[int, Sequence[SpoolRecord]]:
        over_n = self.counters.messages + len(records) - self._max_messages
        over_b = self.counters.bytes + new_bytes - self._max_bytes
        if over_n <= 0 and over_b <= 0:
            return 0, records
        dropped = 0
        if self._on_full == "drop_oldest":
            dropped = self._drop_oldest(db, over_n, over_b)
        keep: list[SpoolRecord] = []
        n, b = self.counters.messages, self.counters.bytes
        for r in records:  # what still does not fit: the newest droppable records go
            if DROP_RANK.get(r.kind, 0) and (n + 1 > self._max_messages or b + len(r.payload) > self._max_bytes):
                self._count_drop(r.kind, 1)
                dropped += 1
                continue
            keep.append(r)
            n, b = n + 1, b + len(r.payload)
        return dropped, keep

    def _drop_oldest(self, db: sqlite3.Connection, over_n: int, over_b: int) -> int:
        dropped = 0
        for rank in sorted(set(DROP_RANK.values()), reverse=True):
            while over_n > 0 or over_b > 0:
                rows = db.execute(
                    "SELECT ord, kind, length(payload) FROM messages WHERE rank = ? ORDER BY ord LIMIT ?",
                    (rank, max(over_n, 0) + 256),
                ).fetchall()
                if not rows:
                    break
                for order, kind, size in rows:
                    if over_n <= 0 and over_b <= 0:
                        break
                    db.execute("DELETE FROM messages WHERE ord = ?", (order,))
                    self.counters.messages -= 1
                    self.counters.bytes -= int(size)
                    over_n, over_b = over_n - 1, over_b - int(size)
                    self._count_drop(str(kind), 1)
                    dropped += 1
        return dropped

    def _count_drop(self, kind: str, n: int) -> None:
        self.counters.dropped[kind] = self.counters.dropped.get(kind, 0) + n
        total = sum(self.counters.dropped.values())
        if total & (total - 1) == 0:
            log.warning("spool %s full: dropped %s so far", self.path, dict(self.counters.dropped))

    def _recount(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages").fetchone()
        self.counters.messages, self.counters.bytes = int(row[0]), int(row[1])

    def read_after(self, order: int, limit: int) -> list[SpoolRecord]:
        """The next ``limit`` records with an order number above ``order``, in order."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT ord, kind, topic, payload, qos, retain FROM messages WHERE ord > ? ORDER BY ord LIMIT ?",
                (order, limit),
            ).fetchall()
        return [SpoolRecord(int(o), str(k), str(t), bytes(p), int(q), bool(r)) for o, k, t, p, q, r in rows]

    def delete(self, orders: Iterable[int]) -> None:
        keys = [(o,) for o in orders]
        if not keys:
            return
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                sizes = 0
                n = 0
                for (o,) in keys:
                    row = db.execute("DELETE FROM messages WHERE ord = ? RETURNING length(payload)", (o,)).fetchone()
                    if row is not None:
                        sizes += int(row[0])
                        n += 1
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self.counters.messages -= n
            self.counters.bytes -= sizes
            self.counters.deleted += n

    def max_order(self) -> int:
        with self._lock:
            row = self._conn().execute("SELECT coalesce(max(ord), 0) FROM messages").fetchone()
        return int(row[0])

    # -- metadata (Sparkplug bdSeq...) ----------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
