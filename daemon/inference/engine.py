"""The interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from daemon.inference.model import LoadedModel


class Engine(Protocol):
    """Runs a model on batches of letterboxed inputs; box decoding and NMS happen outside.

    Engines warm up in their constructor, so the first real batch is not slow.
    """

    model: LoadedModel
    max_batch: int
    name: str

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """(B, 3, H, W) float32 in [0, 1], B <= max_batch -> the model's raw output (B, ...)."""
        ...

    def close(self) -> None:
        """Release the backend's resources; ``infer`` must not be called afterwards."""
        ...
