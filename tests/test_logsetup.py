"""Logging setup: plain/JSON lines, per-module levels, repeats summarized, secrets masked, journald."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.logsetup import RepeatFilter, parse_levels, redact, setup_logging, under_journald


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    touched = ["daemon.sources", "paho", "t.repeat", "t.plain", "t.json", "t.secret"]
    levels = {name: logging.getLogger(name).level for name in touched}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_format_and_module_levels() -> None:
    out = io.StringIO()
    setup_logging("plain", "INFO", {"daemon.sources": "DEBUG", "paho": "WARNING"}, stream=out, environ={})
    logging.getLogger("daemon.sources").debug("camera %s: connecting to %s", "cam1", "http://10.0.0.5/mjpg")
    logging.getLogger("daemon.app").debug("hidden at INFO")
    logging.getLogger("paho").info("hidden at WARNING")
    logging.getLogger("t.plain").info("visible")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith("DEBUG MainThread daemon.sources: camera cam1: connecting to http://10.0.0.5/mjpg")
    assert lines[1].endswith("INFO MainThread t.plain: visible")
    assert lines[0][:4].isdigit()  # a timestamp on a terminal


def test_json_format() -> None:
    out = io.StringIO()
    setup_logging("json", "INFO", stream=out, environ={})
    log = logging.getLogger("t.json")
    log.warning("camera %s: %d frames dropped", "cam2", 7)
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.exception("decode failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "WARNING"
    assert first["logger"] == "t.json"
    assert first["thread"] == "MainThread"
    assert first["msg"] == "camera cam2: 7 frames dropped"
    assert isinstance(first["ts"], float)
    assert second["msg"] == "decode failed"
    assert "ValueError: bad frame" in second["exc"]


def test_levels_are_validated() -> None:
    assert parse_levels({"daemon.sources": "debug"}) == {"daemon.sources": logging.DEBUG}
    with pytest.raises(ValueError, match=r"logging\.levels\.daemon\.sources = 'LOUD'"):
        parse_levels({"daemon.sources": "LOUD"})
    with pytest.raises(ValueError, match=r"logging\.format"):
        setup_logging("xml", stream=io.StringIO())  # type: ignore[arg-type]


def test_repeated_errors_are_summarized() -> None:
    """A dead camera logging the same error 500 times gives one line, then one summary per window."""
    clock = Clock()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    repeats = RepeatFilter(window_s=60.0, clock=clock)
    repeats.emit = handler.handle
    handler.addFilter(repeats)
    log = logging.getLogger("t.repeat")
    log.addHandler(handler)
    log.propagate = False
    try:
        for _ in range(500):
            log.error("camera %s: connect failed: %s", "cam3", "Connection refused")
            clock.now += 0.1  # 50 s in all
        log.error("camera %s: connect failed: %s", "cam4", "Connection refused")  # another text passes
        assert out.getvalue().splitlines() == [
            "ERROR camera cam3: connect failed: Connection refused",
            "ERROR camera cam4: connect failed: Connection refused",
        ]
        clock.now += 15.0  # the cam3 window has passed: the next record brings its summary
        log.warning("something else")
        lines = out.getvalue().splitlines()
        assert lines[2] == ("ERROR camera cam3: connect failed: Connection refused ... repeated 499 times "
                            "in the last 65 s")
        assert lines[3] == "WARNING something else"
        log.error("camera %s: connect failed: %s", "cam3", "Connection refused")  # a new window
        log.error("camera %s: connect failed: %s", "cam3", "Connection refused")
        repeats.flush_all()
        assert out.getvalue().splitlines()[4:] == [
            "ERROR camera cam3: connect failed: Connection refused",
            "ERROR camera cam3: connect failed: Connection refused ... repeated 1 times in the last 0 s",
        ]
    finally:
        log.removeHandler(handler)
        log.propagate = True


def test_setup_logging_wires_the_repeat_filter() -> None:
    out = io.StringIO()
    repeats = setup_logging("json", stream=out, repeat_window_s=30.0, environ={})
    log = logging.getLogger("t.json")
    for _ in range(10):
        log.error("same")
    repeats.flush_all()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["msg"] for r in records] == ["same", records[1]["msg"]]
    assert records[1]["msg"].startswith("same ... repeated 9 times")
    assert records[1]["repeated"] == 9


@pytest.mark.parametrize(("text", "expected"), [
    ("connecting to rtsp://admin:hunter2@10.0.0.7:554/stream1",
     "connecting to rtsp://admin:***@10.0.0.7:554/stream1"),
    ("mqtt password=s3cret user=edge", "mqtt password=*** user=edge"),
    ('{"password": "s3cret", "host": "broker"}', '{"password": "***", "host": "broker"}'),
    ("api_key: abcdef123456", "api_key: ***"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x.y", "Authorization: Bearer ***"),
    ("token=abc&camera=cam1", "token=***&camera=cam1"),
    ("camera cam1: 12 frames, 3 dropped", "camera cam1: 12 frames, 3 dropped"),
    ("password_file=/etc/deltayolo/secrets/cam1", "password_file=/etc/deltayolo/secrets/cam1"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secrets_never_reach_the_stream() -> None:
    out = io.StringIO()
    setup_logging("plain", stream=out, environ={})
    log = logging.getLogger("t.secret")
    log.info("source %s", "rtsp://admin:hunter2@10.0.0.7/live")
    try:
        raise ConnectionError("auth failed for password=hunter2")
    except ConnectionError:
        log.exception("connect failed")
    out2 = io.StringIO()
    setup_logging("json", stream=out2, environ={})
    log.info("source %s", "rtsp://admin:hunter2@10.0.0.7/live")
    assert "hunter2" not in out.getvalue()
    assert "hunter2" not in out2.getvalue()
    assert "rtsp://admin:***@10.0.0.7/live" in out.getvalue()


def test_journald_lines_carry_syslog_priorities(tmp_path: Path) -> None:
    path = tmp_path / "journal-stream"
    with path.open("w+") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(stream, env)
        assert not under_journald(stream, {"JOURNAL_STREAM": "1:2"})
        assert not under_journald(io.StringIO(), env)
        setup_logging("plain", stream=stream, environ=env)
        logging.getLogger("t.plain").error("camera %s failed", "cam1")
        logging.getLogger("t.plain").info("ok")
        for h in logging.getLogger().handlers:
            h.flush()
    assert path.read_text().splitlines() == [
        "<3>ERROR MainThread t.plain: camera cam1 failed",
        "<6>INFO MainThread t.plain: ok",
    ]
