"""Logging to stdout for journald: plain or JSON lines, per-module levels, repeats summarized, secrets masked.

Under systemd (``JOURNAL_STREAM`` names our stdout) plain lines drop the timestamp journald adds anyway
and get a ``<N>`` syslog priority prefix, so ``journalctl -p err`` works. Identical records within a
window are passed once; the rest are counted and summarized as ``... repeated N times`` with the next
record or at ``flush``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TextIO

LogFormat = Literal["plain", "json"]
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
          "CRITICAL": logging.CRITICAL}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}
_SUMMARY_ATTR = "deltayolo_repeat_summary"

# user:password@ in URLs; key=value / key: value / "key": "value" for secret-looking keys; bearer tokens.
_SECRET_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^\s:/@]+):[^\s/@]+@", re.IGNORECASE),
     r"\g<scheme>\g<user>:***@"),
    (re.compile(r"(?P<key>[\"']?\b[\w-]*(?:password|passwd|secret|token|api[_-]?key|credential)s?[\"']?"
                r"\s*[=:]\s*)(?P<q>[\"']?)[^\s\"',;&}]+", re.IGNORECASE),
     r"\g<key>\g<q>***"),
    (re.compile(r"\b(?P<kind>bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE), r"\g<kind> ***"),
)


def redact(text: str) -> str:
    """Mask passwords, tokens and URL credentials in a log line."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class PlainFormatter(logging.Formatter):
    """``time level thread logger: message`` (or ``<prio>level thread logger: message`` for journald)."""

    def __init__(self, journald: bool = False) -> None:
        fmt = "%(levelname)s %(threadName)s %(name)s: %(message)s"
        super().__init__(fmt if journald else "%(asctime)s " + fmt)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if self._journald:
            prio = _SYSLOG_PRIORITY.get(record.levelno, 6)
            text = "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, thread, msg (+ exc, repeated)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exc"] = redact(record.exc_text)
        repeated = getattr(record, _SUMMARY_ATTR, None)
        if repeated is not None:
            out["repeated"] = repeated
        return json.dumps(out, ensure_ascii=False)


@dataclass(slots=True)
class _Seen:
    first: float
    suppressed: int
    record: logging.LogRecord


class RepeatFilter(logging.Filter):
    """Passes the first of identical records (same logger, level, text) per ``window_s``; counts the rest.

    A summary record (``<message> ... repeated N times in the last S s``) goes to ``emit`` once the window has
    passed, checked on every record and on ``flush``. Attach to a handler and set ``emit = handler.handle``.
    """

    def __init__(self, window_s: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if window_s <= 0:
            raise ValueError(f"log repeat window_s must be > 0, got {window_s!r}")
        self._window = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], _Seen] = {}
        self.emit: Callable[[logging.LogRecord], object] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY_ATTR, None) is not None:
            return True
        now = self._clock()
        key = (record.name, record.levelno, record.getMessage())
        with self._lock:
            due = self._expire(now)
            seen = self._seen.get(key)
            if seen is not None:
                seen.suppressed += 1
                passed = False
            else:
                self._seen[key] = _Seen(now, 0, record)
                passed = True
                if len(self._seen) > self._max_keys:
                    due.extend(self._evict_oldest())
        self._emit(due)
        return passed

    def flush(self) -> None:
        """Emit summaries for every window that has passed."""
        with self._lock:
            due = self._expire(self._clock())
        self._emit(due)

    def flush_all(self) -> None:
        """Emit every pending summary now (at shutdown)."""
        with self._lock:
            due = [s for s in self._seen.values() if s.suppressed]
            self._seen.clear()
        self._emit(due)

    def _expire(self, now: float) -> list[_Seen]:
        old = [k for k, s in self._seen.items() if now - s.first >= self._window]
        return [s for s in (self._seen.pop(k) for k in old) if s.suppressed]

    def _evict_oldest(self) -> list[_Seen]:
        key = min(self._seen, key=lambda k: self._seen[k].first)
        s = self._seen.pop(key)
        return [s] if s.suppressed else []

    def _emit(self, due: list[_Seen]) -> None:
        if self.emit is None:
            return
        now = self._clock()
        for s in due:
            rec = logging.makeLogRecord(s.record.__dict__)
            rec.msg = "%s ... repeated %d times in the last %.0f s"
            rec.args = (s.record.getMessage(), s.suppressed, now - s.first)
            rec.exc_info, rec.exc_text, rec.stack_info = None, None, None
            rec.created = time.time()
            setattr(rec, _SUMMARY_ATTR, s.suppressed)
            self.emit(rec)


def parse_levels(levels: Mapping[str, str]) -> dict[str, int]:
    """``{"daemon.sources": "DEBUG"}`` -> logging levels; a ValueError names the module and the value."""
    out: dict[str, int] = {}
    for module, name in levels.items():
        level = LEVELS.get(str(name).upper())
        if level is None:
            raise ValueError(f"logging.levels.{module} = {name!r}: expected one of {', '.join(LEVELS)}")
        out[module] = level
    return out


def under_journald(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journal stream systemd gave us (``JOURNAL_STREAM=dev:inode``)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup_logging(
    fmt: LogFormat = "plain",
    level: str = "INFO",
    levels: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
    repeat_window_s: float = 60.0,
    environ: Mapping[str, str] | None = None,
) -> RepeatFilter:
    """Configure the root logger (replacing its handlers); returns the repeat filter (flush_all at exit)."""
    root_level = parse_levels({"<root>": level})["<root>"]
    module_levels = parse_levels(levels or {})
    if fmt not in ("plain", "json"):
        raise ValueError(f"logging.format = {fmt!r}: expected 'plain' or 'json'")
    out = sys.stdout if stream is None else stream
    env = os.environ if environ is None else environ
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(under_journald(out, env)))
    repeats = RepeatFilter(repeat_window_s)
    repeats.emit = handler.handle
    handler.addFilter(repeats)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(root_level)
    for module, lvl in module_levels.items():
        logging.getLogger(module).setLevel(lvl)
    logging.captureWarnings(True)
    return repeats


__all__ = ["JsonFormatter", "LogFormat", "PlainFormatter", "RepeatFilter", "parse_levels", "redact",
           "setup_logging", "under_journald"]
