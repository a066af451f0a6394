"""A real server reading real stores; every batch checked against anndata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from annserve.client import Connection, CSRArrays, Output, RemoteLoader
from conftest import as_scipy, stop_now

OBS_KEYS = {
    "pbmc3k": ["barcode"],
    "wu2020": ["cluster_orig", "patient"],
    "pbmc68k": ["bulk_labels", "n_genes", "percent_mito", "phase"],
}


def check_batch(batch, adata, obs_keys) -> np.ndarray:
    idx = batch["index"].numpy() if isinstance(batch["index"], torch.Tensor) else batch["index"]
    assert idx.dtype == np.int64
    expected = adata.X[idx]
    x = batch["X"]
    if sp.issparse(expected):
        got = as_scipy(x)
        assert got.dtype == np.float32
        # same sparsity pattern, in the same order, and the same values
        np.testing.assert_array_equal(got.indptr, expected.indptr)
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_array_equal(got.data, expected.data.astype(np.float32))
    else:
        assert x.dtype == torch.float32
        np.testing.assert_array_equal(x.numpy(), expected.astype(np.float32))
    for key in obs_keys:
        want = adata.obs[key].iloc[idx].reset_index(drop=True)
        got = batch["obs"][key]
        if isinstance(want.dtype, pd.CategoricalDtype):
            assert list(got.cat.categories) == [str(c) for c in want.cat.categories]
            assert got.astype(str).tolist() == want.astype(str).tolist()
        else:
            np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    return idx


@pytest.mark.parametrize("name", ["pbmc3k", "wu2020", "pbmc68k"])
def test_full_epoch_equals_anndata(serve, store_path, real_adata, name):
    adata = real_adata(name)
    address = serve(store_path(name))
    loader = RemoteLoader(
        address,
        batch_size=100,
        chunk_size=16,
        preload_nchunks=8,
        seed=0,
        obs_keys=OBS_KEYS[name],
        return_index=True,
    )
    assert (loader.n_obs, loader.n_vars) == adata.shape
    assert loader.var_names == list(adata.var_names)
    seen, sizes = [], []
    for batch in loader:
        seen.append(check_batch(batch, adata, OBS_KEYS[name]))
        sizes.append(len(seen[-1]))
    rows = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(rows), np.arange(adata.n_obs))
    assert len(sizes) == len(loader)
    assert all(s == 100 for s in sizes[:-1])
    assert not np.array_equal(rows, np.arange(adata.n_obs))  # shuffled


@pytest.mark.parametrize(
    ("encoding", "compression"), [("raw", None), ("compact", None), ("compact", "zstd")]
)
@pytest.mark.parametrize("to_dense", [False, True])
def test_encodings_and_dense_output(serve, real_adata, encoding, compression, to_dense):
    from conftest import real_path

    adata = real_adata("wu2020")
    loader = RemoteLoader(
        serve(real_path("wu2020")),
        batch_size=64,
        chunk_size=8,
        preload_nchunks=4,
        seed=1,
        return_index=True,
        connection=Connection(encoding=encoding, compression=compression),
        output=Output(to_dense=to_dense),
        obs_keys=["source"],
    )
    seen = []
    for batch in loader:
        if to_dense:
            assert batch["X"].layout == torch.strided
            idx = batch["index"].numpy()
            np.testing.assert_array_equal(batch["X"].numpy(), adata.X[idx].toarray())
            seen.append(idx)
        else:
            assert batch["X"].layout == torch.sparse_csr
            seen.append(check_batch(batch, adata, ["source"]))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))


def test_numpy_output_without_torch_tensors(serve, real_adata):
    from conftest import real_path

    adata = real_adata("pbmc3k")
    loader = RemoteLoader(
        serve(real_path("pbmc3k")),
        batch_size=512,
        output=Output(to_torch=False),
        return_index=True,
        seed=2,
    )
    batch = next(iter(loader))
    assert isinstance(batch["X"], CSRArrays)
    assert isinstance(batch["index"], np.ndarray)
    assert batch["X"].indices.dtype == batch["X"].indptr.dtype == np.int32
    check_batch(batch, adata, [])


def test_no_shuffle_yields_store_order_and_drop_last(serve, real_adata):
    from conftest import real_path

    adata = real_adata("wu2020")
    loader = RemoteLoader(
        serve(real_path("wu2020")),
        batch_size=64,
        chunk_size=8,
        preload_nchunks=3,
        shuffle=False,
        drop_last=True,
        return_index=True,
    )
    batches = [check_batch(b, adata, []) for b in loader]
    assert len(batches) == len(loader) == 3  # 200 rows: 3 full batches, the short one dropped
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(192))


def test_epochs_are_reproducible_and_distinct(serve):
    from conftest import real_path

    address = serve(real_path("wu2020"))

    def order(seed: int, epoch: int) -> np.ndarray:
        loader = RemoteLoader(
            address,
            batch_size=50,
            chunk_size=4,
            preload_nchunks=10,
            seed=seed,
            return_index=True,
        )
        loader.set_epoch(epoch)
        return np.concatenate([b["index"].numpy() for b in loader])

    np.testing.assert_array_equal(order(5, 1), order(5, 1))
    assert not np.array_equal(order(5, 1), order(5, 2))
    assert not np.array_equal(order(5, 1), order(6, 1))


def test_iterations_continue_where_the_last_one_stopped(serve):
    from conftest import real_path

    loader = RemoteLoader(
        serve(real_path("wu2020")),
        batch_size=50,
        chunk_size=4,
        preload_nchunks=10,
        seed=0,
        return_index=True,
    )
    batches = iter(loader)
    first = next(batches)["index"].numpy()
    batches.close()
    assert (loader.epoch, loader.state_dict()["batch"]) == (0, 1)
    rest = [b["index"].numpy() for b in loader]  # the other 3 batches of epoch 0
    assert len(rest) == 3
    np.testing.assert_array_equal(np.sort(np.concatenate([first, *rest])), np.arange(200))
    assert loader.epoch == 1
    assert not np.array_equal(next(iter(loader))["index"].numpy(), first)
    loader.set_epoch(0)
    np.testing.assert_array_equal(next(iter(loader))["index"].numpy(), first)


def test_abandoned_stream_stops_server_reader(serve):
    import threading
    import time

    from conftest import real_path

    loader = RemoteLoader(
        serve(real_path("pbmc3k")),
        batch_size=16,
        chunk_size=4,
        preload_nchunks=2,
        seed=0,
    )
    batches = iter(loader)
    next(batches)
    assert any(t.name.startswith("annserve-stream") for t in threading.enumerate())
    batches.close()  # what a training loop's `break` does once the generator is collected

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [
            t.name
            for t in threading.enumerate()
            if t.name.startswith(("annserve-stream", "annserve-decode"))
        ]
        if not alive:
            break
        time.sleep(0.05)
    assert alive == []


def test_unix_socket_address(tmp_path, real_adata):
    from annserve.server import create_server, open_store
    from conftest import real_path

    sock = tmp_path / "annserve.sock"
    server, _ = create_server({"wu": open_store(real_path("wu2020"))}, [f"unix:{sock}"])
    try:
        loader = RemoteLoader(f"unix:{sock}", batch_size=64, return_index=True, seed=0)
        rows = np.concatenate([check_batch(b, real_adata("wu2020"), []) for b in loader])
        np.testing.assert_array_equal(np.sort(rows), np.arange(200))
    finally:
        stop_now(server)
