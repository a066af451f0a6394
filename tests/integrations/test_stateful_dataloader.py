"""torchdata's ``StatefulDataLoader`` over ``RemoteLoader`` with spawn workers.

Each worker streams its own sub-shard and its ``RemoteLoader`` state (batches yielded)
travels in the worker states, so a ``state_dict()`` taken mid-epoch resumes exactly:
the resumed run yields the uninterrupted run's remaining batches, every row once. A
``transform`` (normalize + log1p on the sparse CSR batch) is pickled into the workers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from annserve.client import Connection, RemoteLoader
from conftest import real_path

stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")

MAX_BATCHES = 100  # the epoch has 28; more is a failure, not a hang
# longest wait for a worker batch, s: spawn workers import torch on a busy 2-core machine
WORKER_TIMEOUT_S = 180
STOP_AFTER = 9  # batches taken before the state is saved (odd: mid-round of the 2 workers)
ARGS = dict(batch_size=100, chunk_size=16, preload_nchunks=8, seed=5, return_index=True)


class NormalizeLog1p:
    """Scale each cell to ``target_sum`` counts, then ``log1p`` (a picklable transform)."""

    def __init__(self, target_sum: float = 1e4) -> None:
        self.target_sum = target_sum

    def __call__(self, batch: dict) -> dict:
        x = batch["X"]  # torch sparse CSR, (cells, genes)
        crow, values = x.crow_indices(), x.values()
        row = torch.repeat_interleave(torch.arange(x.shape[0]), torch.diff(crow))
        totals = torch.zeros(x.shape[0], dtype=values.dtype).index_add_(0, row, values)
        scaled = torch.log1p(values / totals.clamp(min=1)[row] * self.target_sum)
        batch["X"] = torch.sparse_csr_tensor(crow, x.col_indices(), scaled, x.shape)
        batch["pid"] = torch.tensor(__import__("os").getpid())
        return batch


def data_loader(address: str, state: dict | None = None):
    loader = RemoteLoader(
        address, transform=NormalizeLog1p(), connection=Connection(timeout=30.0), **ARGS
    )
    dl = stateful_dataloader.StatefulDataLoader(
        loader,
        batch_size=None,
        num_workers=2,
        multiprocessing_context="spawn",
        timeout=WORKER_TIMEOUT_S,
    )
    if state is not None:
        dl.load_state_dict(state)
    return dl


def test_mid_epoch_state_resumes_exactly(serve, real_adata):
    adata = real_adata("pbmc3k")
    address = serve(real_path("pbmc3k"))

    full = []
    for n, batch in enumerate(data_loader(address)):
        assert n < MAX_BATCHES
        full.append(batch)
    assert len(full) == 28  # 2 workers x 14 batches of their 1,350 rows
    full_rows = np.concatenate([b["index"].numpy() for b in full])
    np.testing.assert_array_equal(np.sort(full_rows), np.arange(adata.n_obs))
    assert len({int(b["pid"]) for b in full}) == 2  # the transform ran in both workers

    # the transform's output: scanpy's normalize_total(target_sum=1e4) + log1p
    x = adata.X[full[3]["index"].numpy()].astype(np.float64)
    want = np.log1p(x.multiply(1e4 / np.maximum(x.sum(axis=1), 1)).toarray())
    np.testing.assert_allclose(full[3]["X"].to_dense().numpy(), want, rtol=1e-5, atol=1e-6)

    first, it = [], iter(dl := data_loader(address))
    for _ in range(STOP_AFTER):
        first.append(next(it))
    state = dl.state_dict()
    del it, dl  # the workers (and their streams) go away

    rest = []
    for n, batch in enumerate(data_loader(address, state)):
        assert n < MAX_BATCHES
        rest.append(batch)
    resumed = [b["index"].numpy() for b in first + rest]
    assert len(resumed) == len(full)
    for got, want_rows in zip(resumed, (b["index"].numpy() for b in full), strict=True):
        np.testing.assert_array_equal(got, want_rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(resumed)), np.arange(adata.n_obs))
