"""Collections, layers, gene subsets and several named stores, served end to end."""

from __future__ import annotations

import anndata as ad
import grpc
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import zarr

from annserve.client import Connection, RemoteLoader
from annserve.errors import InvalidRequestError
from annserve.server import create_server, open_store
from annserve.server.rpc.cli import main as cli_main
from collection_stores import annbatch_collection  # noqa: F401 (a fixture)
from conftest import as_scipy, raw_stream, real_path, stop_now

SPLITS = (0, 70, 71, 200)  # wu2020 in three groups, one of a single cell


@pytest.fixture(scope="module")
def wu_collection(tmp_path_factory, real_adata):
    """wu2020 split into AnnData groups of one zarr v3 group, the layout annbatch writes."""
    adata = real_adata("wu2020")
    path = tmp_path_factory.mktemp("coll") / "collection.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3)
    for i, (a, b) in enumerate(zip(SPLITS[:-1], SPLITS[1:], strict=True)):
        part = ad.AnnData(X=adata.X[a:b], obs=adata.obs.iloc[a:b], var=adata.var)
        ad.io.write_elem(root, f"dataset_{i}", part)
    return path


@pytest.fixture(scope="module")
def layered(tmp_path_factory, real_adata):
    """wu2020 with a `counts` layer that differs from X."""
    adata = real_adata("wu2020")
    path = tmp_path_factory.mktemp("layer") / "layered.h5ad"
    ad.AnnData(
        X=adata.X,
        obs=adata.obs,
        var=adata.var,
        layers={"counts": adata.X * 3 + adata.X.multiply(adata.X)},
    ).write_h5ad(path)
    return path


def epoch(loader) -> list[dict]:
    return list(loader)


def test_collection_is_one_virtual_dataset(serve, wu_collection, real_adata):
    adata = real_adata("wu2020")
    store = open_store(wu_collection)
    np.testing.assert_array_equal(store.group_offsets, SPLITS)
    loader = RemoteLoader(
        serve(wu_collection),
        batch_size=32,
        chunk_size=8,
        preload_nchunks=3,
        seed=4,
        return_index=True,
        obs_keys=["patient"],
    )
    assert loader.n_obs == adata.n_obs
    seen = []
    for batch in epoch(loader):
        idx = batch["index"].numpy()
        expected = adata.X[idx]
        got = as_scipy(batch["X"])
        np.testing.assert_array_equal(got.toarray(), expected.toarray())
        assert (
            batch["obs"]["patient"].astype(str).tolist()
            == adata.obs["patient"].iloc[idx].astype(str).tolist()
        )
        seen.append(idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))


def test_collection_groups_of_other_genes_need_missing_genes_zeros(tmp_path, real_adata, serve):
    # served in the union of the groups' genes only when asked (tests/integrations/test_gene_vocab)
    adata = real_adata("wu2020")
    root = zarr.open_group(tmp_path / "mixed.zarr", mode="w", zarr_format=3)
    ad.io.write_elem(root, "dataset_0", adata[:10].copy())
    ad.io.write_elem(root, "dataset_1", adata[10:20, :100].copy())
    assert open_store(tmp_path / "mixed.zarr").mixed_genes
    with pytest.raises(InvalidRequestError, match="different genes"):
        RemoteLoader(serve(tmp_path / "mixed.zarr"))


def test_layer_instead_of_x(serve, layered):
    adata = ad.read_h5ad(layered)
    address = serve(layered)
    loader = RemoteLoader(address, layer="counts", batch_size=50, return_index=True, seed=0)
    for batch in epoch(loader):
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(
            as_scipy(batch["X"]).toarray(), adata.layers["counts"][idx].toarray()
        )


def test_unknown_layer_is_invalid_argument(serve, layered):
    address = serve(layered)
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, batch_size=8, chunk_size=4, preload_nchunks=2, layer="spliced")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spliced" in err.value.details()
    assert "counts" in err.value.details()
    with pytest.raises(InvalidRequestError, match="layer"):
        RemoteLoader(address, layer="spliced")


@pytest.mark.parametrize("name", ["wu2020", "pbmc68k"])
def test_gene_subset_in_requested_order(serve, real_adata, name):
    adata = real_adata(name)
    rng = np.random.default_rng(0)
    genes = list(rng.choice(adata.var_names, size=40, replace=False))
    loader = RemoteLoader(
        serve(real_path(name)),
        var_names=genes,
        batch_size=64,
        return_index=True,
        seed=1,
    )
    assert loader.n_vars == 40
    assert loader.var_names == genes
    expected_x = adata[:, genes].X
    for batch in epoch(loader):
        idx = batch["index"].numpy()
        want = expected_x[idx]
        want = want.toarray() if sp.issparse(want) else want
        x = batch["X"]
        assert tuple(x.shape) == (len(idx), 40)
        got = as_scipy(x).toarray() if x.layout == torch.sparse_csr else x.numpy()
        np.testing.assert_array_equal(got, want)


def test_unknown_or_repeated_genes_are_invalid_argument(serve):
    address = serve(real_path("wu2020"))
    base = {"batch_size": 8, "chunk_size": 4, "preload_nchunks": 2}
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, **base, var_names=["CD3E", "NOT_A_GENE", "ALSO_NOT"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NOT_A_GENE" in err.value.details()
    assert "var_names" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, **base, var_names=["CD3E", "CD3E"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CD3E" in err.value.details()


def test_several_named_stores(real_adata):
    stores = {"wu": open_store(real_path("wu2020")), "pbmc": open_store(real_path("pbmc68k"))}
    server, (port,) = create_server(stores, ["127.0.0.1:0"])
    try:
        address = f"127.0.0.1:{port}"
        assert RemoteLoader(address).n_obs == 200  # the first is the default
        pbmc = RemoteLoader(address, store="pbmc", batch_size=700, return_index=True)
        assert pbmc.n_vars == real_adata("pbmc68k").n_vars
        assert len(next(iter(pbmc))["index"]) == 700
        with pytest.raises(grpc.RpcError) as err:
            raw_stream(
                address, store="../etc/passwd", batch_size=8, chunk_size=4, preload_nchunks=2
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stop_now(server)


def test_cli_rejects_duplicate_store_names(capsys):
    path = str(real_path("wu2020"))
    assert cli_main(["--store", f"a={path}", "--store", f"a={path}", "--port", "0"]) == 3
    assert "unique" in capsys.readouterr().err


def check_full_epoch(address, adata, **options) -> None:
    loader = RemoteLoader(
        address,
        batch_size=100,
        chunk_size=16,
        preload_nchunks=4,
        seed=2,
        return_index=True,
        connection=Connection(timeout=30),
        **options,
    )
    assert (loader.n_obs, loader.n_vars) == adata.shape
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        np.testing.assert_array_equal(as_scipy(batch["X"]).toarray(), adata.X[idx].toarray())
        seen.append(idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))


def test_annbatch_dataset_collection_served_as_is(serve, annbatch_collection):  # noqa: F811
    collection = annbatch_collection
    store = open_store(collection.path)
    np.testing.assert_array_equal(np.diff(store.group_offsets), collection.group_sizes)
    check_full_epoch(serve(collection.path), collection.adata)


def test_converted_collection_served_end_to_end(serve, tmp_path, real_adata):
    from annserve.server.convert import convert

    out = tmp_path / "atlas.zarr"
    convert(
        [real_path("pbmc3k"), real_path("wu2020")],
        out,
        seed=1,
        progress=False,
        max_bucket_bytes=8 << 20,
    )
    reference = ad.concat(
        [ad.read_zarr(out / f"dataset_{i}") for i in range(len(open_store(out).group_offsets) - 1)]
    )
    check_full_epoch(serve(out), reference, obs_keys=["dataset"])


@pytest.mark.parametrize("kind", ["dense", "mixed-dtypes"])
def test_collection_groups_read_into_one_buffer(serve, tmp_path, real_adata, kind):
    adata = real_adata("pbmc68k" if kind == "dense" else "wu2020")
    root = zarr.open_group(tmp_path / "c.zarr", mode="w", zarr_format=3)
    half = adata.n_obs // 2
    for i, part in enumerate((adata[:half], adata[half:])):
        x = part.X.astype(np.float64) if kind == "mixed-dtypes" and i else part.X
        ad.io.write_elem(root, f"dataset_{i}", ad.AnnData(X=x, obs=part.obs, var=part.var))
    loader = RemoteLoader(
        serve(tmp_path / "c.zarr"),
        batch_size=64,
        chunk_size=8,
        seed=3,
        preload_nchunks=8,
        return_index=True,
    )
    seen = []
    for batch in loader:
        idx = batch["index"].numpy()
        x = batch["X"]
        got = as_scipy(x).toarray() if x.layout == torch.sparse_csr else x.numpy()
        want = adata.X[idx]
        np.testing.assert_array_equal(got, want.toarray() if sp.issparse(want) else want)
        seen.append(idx)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))
