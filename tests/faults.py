"""Fault injection for tests: a training batch poisoned with NaN (the loop itself has no hook)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from vq_jax import data


class PoisonedBatches:
    """Wraps a train iterator: its `step`-th batch (0-based, counted from its first `next`, i.e.
    the batch of step `step` in a fresh run) has every float array filled with NaN."""

    def __init__(self, it: Any, step: int) -> None:
        self._it, self._step, self._calls = it, step, 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._calls += 1
        if self._calls - 1 != self._step:
            return batch
        return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in batch.items()}

    def __getattr__(self, name: str) -> Any:  # get_state, set_state, close
        return getattr(self._it, name)


def poison_batch(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Makes every train iterator the input pipeline builds poison its batch of step `step`."""
    make = data.make_train_iter
    monkeypatch.setattr(
        data, "make_train_iter", lambda *a, **k: PoisonedBatches(make(*a, **k), step)
    )
