"""Where fetched models, videos and engines live (the systemd units rely on XDG_CACHE_HOME)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.models.fetch import cache_dir


def test_cache_dir_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DELTAYOLO_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "deltayolo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "deltayolo"
    monkeypatch.setenv("DELTAYOLO_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
