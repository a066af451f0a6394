"""Helpers of the transport tests (shared memory, bulk channel): epochs, comparisons, kills."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from annserve.client import RemoteLoader
    from annserve.server.io.store import Store

#: Seconds any wait in these tests may take.
BOUND_S = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = BOUND_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def sigkilled_client(script: str, address: str, ready: str) -> Iterator[subprocess.Popen]:
    """Run ``python -c script address``; yield it once it prints ``ready``; SIGKILL it at exit."""
    client = subprocess.Popen(
        [sys.executable, "-c", script, address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == ready
        yield client
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=BOUND_S)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=BOUND_S)
        assert client.stdout is not None
        client.stdout.close()


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


def spy_reads(store: Store) -> list[str]:
    """Record the matrix of every ``store.read_rows`` call (a read into a preload buffer).

    Returns the list the keys (``"X"``, ``"obsm/<name>"``...) are appended to, call by
    call; rows a stream takes where they lie (:meth:`Store.locate_rows`) add nothing.
    """
    read_rows, reads = store.read_rows, []

    def spied(rows, key="X", pool=None, **options):
        reads.append(key)
        return read_rows(rows, key, pool, **options)

    store.read_rows = spied  # type: ignore[method-assign]
    return reads
