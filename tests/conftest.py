"""Session fixtures: the real model, video and photos, fetched by hash into the user cache once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from daemon.backend import EngineChoice

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _ensure(name: str) -> Path:
    from daemon.models.fetch import ensure

    return ensure(name)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return _ensure("yolov8n")


@pytest.fixture(scope="session")
def vtest_path() -> Path:
    return _ensure("vtest")


@pytest.fixture(scope="module")
def cpu_engine(model_path: Path) -> Iterator[EngineChoice]:
    """The real model on onnxruntime's CPU path (one thread, batches of up to 4), one per test module."""
    from daemon.backend import build_engine
    from daemon.config.model import ModelConfig

    choice = build_engine(ModelConfig(path=str(model_path), threads=1), 4)
    yield choice
    choice.engine.close()


@pytest.fixture(scope="session")
def bus_path() -> Path:
    return _ensure("bus")


@pytest.fixture(scope="session")
def zidane_path() -> Path:
    return _ensure("zidane")


def _has_gpu() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU with CuPy on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
