"""Helpers of the transport tests (shared memory, bulk channel): epochs and comparisons."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

    from annserve.client import RemoteLoader

#: Seconds any wait in these tests may take.
BOUND_S = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def epoch_rows(batches) -> int:
    """Rows of X in an iterable of batches."""
    return sum(int(b["X"].shape[0]) for b in batches)


def epoch(loader: RemoteLoader) -> list[dict]:
    return [dict(b) for b in loader]


def same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["index"], y["index"])
        same_tensor(x["X"], y["X"])
        assert x["obs"].equals(y["obs"])
        assert x.keys() == y.keys()
        for key in x.get("obsm", {}):
            same_tensor(x["obsm"][key], y["obsm"][key])


def same_tensor(x: torch.Tensor, y: torch.Tensor) -> None:
    """Equal values, dtype and layout; CSR index dtypes may differ (int32 or int64)."""
    assert x.layout == y.layout
    assert x.dtype == y.dtype
    if x.layout != torch.sparse_csr:
        assert torch.equal(x, y)
        return
    assert torch.equal(x.crow_indices().long(), y.crow_indices().long())
    assert torch.equal(x.col_indices().long(), y.col_indices().long())
    assert torch.equal(x.values(), y.values())
