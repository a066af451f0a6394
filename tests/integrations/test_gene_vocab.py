"""A fixed gene vocabulary (a foundation model's) over stores that lack some of its genes.

``missing_genes="zeros"`` serves the absent genes as all-zero columns: bit-exact values
for the present genes, no non-zeros for the absent ones, on an ``.h5ad`` (CSR), a dense
store and a collection whose groups have different gene spaces.
"""

from __future__ import annotations

import anndata as ad
import grpc
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import InvalidRequestError
from annserve.server import open_store
from conftest import as_scipy, raw_stream, real_path

TIMEOUT = Connection(timeout=30.0)
MAX_BATCHES = 200  # every epoch here has fewer; a loop past it is a failure, not a hang


def vocabulary(var_names, n_present: int, n_absent: int, seed: int = 0) -> list[str]:
    """``n_present`` genes of the store and ``n_absent`` it lacks, shuffled together."""
    rng = np.random.default_rng(seed)
    present = list(rng.choice(np.asarray(var_names), size=n_present, replace=False))
    vocab = present + [f"ABSENT-{i}" for i in range(n_absent)]
    return [vocab[i] for i in rng.permutation(len(vocab))]


def expected(x, var_names, vocab) -> np.ndarray:
    """The store's X at the vocabulary's genes (dense), zeros for genes it lacks."""
    position = {v: i for i, v in enumerate(var_names)}
    cols = np.array([position.get(v, -1) for v in vocab])
    x = sp.csr_matrix(x) if sp.issparse(x) else x
    out = np.zeros((x.shape[0], len(vocab)), dtype=x.dtype)
    picked = x[:, cols[cols >= 0]]
    out[:, cols >= 0] = picked.toarray() if sp.issparse(picked) else picked
    return out


def stream_all(loader) -> tuple[np.ndarray, list]:
    """One epoch: (global row of each row, X of each batch)."""
    index, xs = [], []
    for n, batch in enumerate(loader):
        assert n < MAX_BATCHES
        index.append(np.asarray(batch["index"]))
        xs.append(batch["X"])
    return np.concatenate(index), xs


def test_absent_genes_are_an_error_by_default(serve):
    address = serve(real_path("pbmc3k"))
    vocab = ["CD3E", "ABSENT-0", "ABSENT-1"]
    with pytest.raises(InvalidRequestError, match=r"ABSENT-0.*MISSING_GENES_ZEROS"):
        RemoteLoader(address, var_names=vocab, connection=TIMEOUT)
    with pytest.raises(InvalidRequestError, match="missing_genes must be one of"):
        RemoteLoader(address, var_names=vocab, missing_genes="skip", connection=TIMEOUT)
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, batch_size=8, chunk_size=8, preload_nchunks=2, missing_genes=7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing_genes" in err.value.details()


def test_vocabulary_with_absent_genes_csr(serve, real_adata):
    adata = real_adata("pbmc3k")
    vocab = vocabulary(adata.var_names, 300, 40)
    loader = RemoteLoader(
        serve(real_path("pbmc3k")),
        var_names=vocab,
        missing_genes="zeros",
        batch_size=512,
        chunk_size=16,
        preload_nchunks=8,
        seed=3,
        dtype=None,  # the store's float32: compared bit for bit
        return_index=True,
        output=Output(to_torch=False),
        connection=TIMEOUT,
    )
    assert loader.missing_genes == 40
    assert loader.n_vars == len(vocab)
    assert loader.var_names == vocab
    index, xs = stream_all(loader)
    np.testing.assert_array_equal(np.sort(index), np.arange(adata.n_obs))
    got = sp.vstack([as_scipy(x) for x in xs]).tocsr()
    assert got.dtype == adata.X.dtype
    want = expected(adata.X[index], adata.var_names, vocab)
    np.testing.assert_array_equal(got.toarray(), want)
    absent = np.array([v.startswith("ABSENT-") for v in vocab])
    assert not np.isin(got.indices, np.flatnonzero(absent)).any()  # sparse: no stored zeros
    assert got.nnz == np.count_nonzero(want)
    assert all(np.all(np.diff(r.indices) > 0) for r in (got[i] for i in range(0, got.shape[0], 97)))


def test_vocabulary_with_absent_genes_dense(serve, real_adata):
    adata = real_adata("pbmc68k")  # dense X
    vocab = vocabulary(adata.var_names, 50, 10, seed=1)
    loader = RemoteLoader(
        serve(real_path("pbmc68k")),
        var_names=vocab,
        missing_genes="zeros",
        batch_size=128,
        dtype=None,
        return_index=True,
        connection=TIMEOUT,
    )
    assert loader.missing_genes == 10
    index, xs = stream_all(loader)
    got = np.concatenate([x.numpy() for x in xs])
    np.testing.assert_array_equal(got, expected(adata.X[index], adata.var_names, vocab))


@pytest.fixture(scope="module")
def mixed_collection(tmp_path_factory, real_adata):
    """pbmc3k in two groups of different gene spaces: genes 0-1499, and 1000-2499 reversed."""
    adata = real_adata("pbmc3k")
    path = tmp_path_factory.mktemp("mixed") / "mixed.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3)
    genes = [np.arange(0, 1500), np.arange(1000, 2500)[::-1]]
    rows = [np.arange(0, 1300), np.arange(1300, adata.n_obs)]
    for i, (r, g) in enumerate(zip(rows, genes, strict=True)):
        part = ad.AnnData(X=adata.X[r][:, g], obs=adata.obs.iloc[r], var=adata.var.iloc[g])
        ad.io.write_elem(root, f"dataset_{i}", part)
    return path, rows, genes


def test_collection_of_different_gene_spaces(serve, real_adata, mixed_collection):
    adata = real_adata("pbmc3k")
    path, rows, genes = mixed_collection
    store = open_store(path)
    assert store.mixed_genes
    union = list(adata.var_names[:2500])  # first-seen order: group 0's, then group 1's new ones
    assert sorted(store.var_names) == sorted(union)
    assert list(store.var_names[:1500]) == union[:1500]
    address = serve(path)
    with pytest.raises(InvalidRequestError, match="different genes"):
        RemoteLoader(address, connection=TIMEOUT)

    # the reference: each group's own values, zeros for the genes it lacks
    truth = adata.X[:, :2500].toarray()
    for r, g in zip(rows, genes, strict=True):
        lacking = np.setdiff1d(np.arange(2500), g)
        truth[np.ix_(r, lacking)] = 0

    common = dict(batch_size=256, chunk_size=16, preload_nchunks=4, seed=0, dtype=None)
    whole = RemoteLoader(
        address, missing_genes="zeros", return_index=True, connection=TIMEOUT, **common
    )
    assert whole.n_vars == 2500
    assert whole.missing_genes == 0
    index, xs = stream_all(whole)
    np.testing.assert_array_equal(np.sort(index), np.arange(adata.n_obs))
    got = sp.vstack([as_scipy(x) for x in xs]).tocsr()
    position = {v: i for i, v in enumerate(adata.var_names)}
    order = [position[v] for v in store.var_names]
    np.testing.assert_array_equal(got.toarray(), truth[index][:, order])
    assert got.has_sorted_indices

    # a vocabulary: genes of group 0 only, of group 1 only, of both, and of neither
    vocab = [*union[5:10], *union[2000:2005], *union[1200:1205], "ABSENT-0", "ABSENT-1"]
    vocab = [vocab[i] for i in np.random.default_rng(0).permutation(len(vocab))]
    loader = RemoteLoader(
        address,
        var_names=vocab,
        missing_genes="zeros",
        return_index=True,
        connection=TIMEOUT,
        **common,
    )
    assert loader.missing_genes == 2
    index, xs = stream_all(loader)
    got = sp.vstack([as_scipy(x) for x in xs]).toarray()
    cols = [position.get(v, -1) for v in vocab]
    want = np.zeros_like(got)
    want[:, [i for i, c in enumerate(cols) if c >= 0]] = truth[index][
        :, [c for c in cols if c >= 0]
    ]
    np.testing.assert_array_equal(got, want)
    assert got[:, [i for i, c in enumerate(cols) if c < 0]].sum() == 0
