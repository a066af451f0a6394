"""``annserve convert`` keeps what an AnnData store holds: obs dtypes, obsm, varm, uns, raw.

Every check reads the collection with :func:`anndata.read_zarr` and compares it value
for value with anndata's read of the input, rows matched through the obs names (convert
shuffles the rows).
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from annserve.server.convert import convert
from conftest import real_path

if TYPE_CHECKING:
    from pathlib import Path

    from annserve.server.convert import Manifest

SMALL_BUCKET = 16 << 10  # bytes: a generated input in several groups


def groups_of(path: Path, manifest: Manifest) -> list[ad.AnnData]:
    """Every group of the collection, read with anndata."""
    return [ad.read_zarr(path / g.name) for g in manifest.groups]


def in_input_order(groups: list[ad.AnnData], obs_names: pd.Index) -> ad.AnnData:
    """The groups' cells (one input's) in the input's order, through the obs names."""
    whole = ad.concat(groups, merge="same")
    return whole[pd.Index(whole.obs_names).get_indexer(obs_names)]


def write_h5ad(path: Path, adata: ad.AnnData) -> Path:
    """Write as anndata does, but keep string columns (``write_h5ad`` makes categoricals)."""
    with ad.settings.override(allow_write_nullable_strings=True), h5py.File(path, "w") as f:
        ad.io.write_elem(f, "/", adata)
    return path


def generated(n_obs: int = 300, n_vars: int = 40, seed: int = 0) -> ad.AnnData:
    """A small AnnData with nullable, integer-categorical and sparse obsm annotations."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, n_vars, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    missing = rng.random(n_obs) < 0.2
    obs = pd.DataFrame(
        {
            "count": pd.array(
                np.where(missing, None, rng.integers(0, 9, n_obs)).tolist(), dtype="Int64"
            ),
            "flag": pd.array(np.where(missing, None, rng.random(n_obs) < 0.5).tolist(), "boolean"),
            "note": pd.array(np.where(missing, None, "n").tolist(), dtype="string"),
            "level": pd.Categorical(
                rng.choice([0, 10, 20], n_obs), categories=pd.Index([20, 10, 0], dtype=np.int32)
            ),
            "rank": pd.Categorical(
                rng.choice([1, 2, 3], n_obs), pd.Index([1, 2, 3], dtype=np.uint8), ordered=True
            ),
        },
        index=[f"c{seed}_{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame({"score": rng.random(n_vars)}, index=[f"g{i}" for i in range(n_vars)])
    return ad.AnnData(
        X=x,
        obs=obs,
        var=var,
        obsm={
            "dense": rng.random((n_obs, 3)).astype(np.float32),
            "sparse": sp.random(n_obs, 7, density=0.3, format="csr", random_state=rng),
        },
        varm={"loadings": rng.random((n_vars, 2))},
        layers={"counts": x.copy(), "twice": x * 2},
        uns={"note": "hello", "params": {"k": np.arange(3)}},
        obsp={"graph": sp.identity(n_obs, format="csr")},
    )


def test_nullable_and_integer_categorical_obs_columns(tmp_path):
    src = generated()
    path = write_h5ad(tmp_path / "gen.h5ad", src)
    manifest = convert([path], tmp_path / "c.zarr", progress=False, max_bucket_bytes=SMALL_BUCKET)
    groups = groups_of(tmp_path / "c.zarr", manifest)
    assert len(groups) > 1
    for column, dtype in {"count": "Int64", "flag": "boolean", "note": "string"}.items():
        assert all(g.obs[column].dtype == dtype for g in groups), column
    got = in_input_order(groups, src.obs_names).obs
    for column in ("count", "flag", "note"):
        assert (got[column].isna().to_numpy() == src.obs[column].isna().to_numpy()).all()
        pd.testing.assert_series_equal(got[column], src.obs[column], check_index=False)
    for column in ("level", "rank"):
        for g in groups:
            assert g.obs[column].dtype == src.obs[column].dtype, column  # categories, order
            assert g.obs[column].cat.categories.dtype == src.obs[column].cat.categories.dtype
        assert (got[column].to_numpy() == src.obs[column].to_numpy()).all()


def old_format_h5ad(path: Path, n_obs: int = 60, n_vars: int = 5) -> Path:
    """An h5ad as anndata 0.7 wrote it: categoricals as int codes + a ``categories`` ref."""
    rng = np.random.default_rng(0)
    labels = np.array(["B", "NK", "T"], dtype=object)
    codes = rng.integers(0, 3, n_obs).astype(np.int8)
    x = sp.random(n_obs, n_vars, density=0.5, format="csr", dtype=np.float32, random_state=rng)
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        group = f.create_group("X")
        group.attrs.update(
            {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": x.shape}
        )
        for key in ("data", "indices", "indptr"):
            group[key] = getattr(x, key)
        for key, names in (("obs", [f"cell{i}" for i in range(n_obs)]), ("var", list("abcde"))):
            frame = f.create_group(key)
            frame.attrs.update(
                {"_index": "index", "encoding-type": "dataframe", "encoding-version": "0.1.0"}
            )
            frame.create_dataset("index", data=names, dtype=strings)
            frame.attrs["column-order"] = ["cell_type"] if key == "obs" else []
        obs = f["obs"]
        obs.create_dataset("__categories/cell_type", data=labels, dtype=strings)
        obs["cell_type"] = codes
        obs["cell_type"].attrs["categories"] = obs["__categories/cell_type"].ref
    return path


def test_old_format_categoricals(tmp_path):
    path = old_format_h5ad(tmp_path / "old.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on the old layout
        src = ad.read_h5ad(path)
    assert isinstance(src.obs["cell_type"].dtype, pd.CategoricalDtype)  # the test is honest
    manifest = convert([path], tmp_path / "c.zarr", progress=False)
    got = in_input_order(groups_of(tmp_path / "c.zarr", manifest), src.obs_names).obs
    assert got["cell_type"].cat.categories.tolist() == ["B", "NK", "T"]
    assert (got["cell_type"].to_numpy() == src.obs["cell_type"].to_numpy()).all()


def assert_same_rows(got: np.ndarray | sp.spmatrix, want: np.ndarray | sp.spmatrix) -> None:
    """Equal values; CSR where ``want`` is sparse (a dense ``want`` may come back CSR)."""
    if sp.issparse(want) or sp.issparse(got):
        assert sp.issparse(got)
        assert got.shape == want.shape
        assert (sp.csr_matrix(got) != sp.csr_matrix(want)).nnz == 0
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def assert_uns_equal(got: object, want: object) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict)
        assert set(got) == set(want)
        for key in want:
            assert_uns_equal(got[key], want[key])
    elif sp.issparse(want):
        assert_same_rows(got, want)
    elif isinstance(want, pd.DataFrame):
        pd.testing.assert_frame_equal(got, want)
    else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_obsm_varm_uns_layers_carried_obsp_warned(tmp_path, caplog):
    src = generated()
    path = write_h5ad(tmp_path / "gen.h5ad", src)
    with caplog.at_level(logging.WARNING, logger="annserve.server.convert"):
        manifest = convert(
            [path], tmp_path / "c.zarr", progress=False, max_bucket_bytes=SMALL_BUCKET
        )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert str(path) in warned[0]
    assert "obsp/graph" in warned[0]
    groups = groups_of(tmp_path / "c.zarr", manifest)
    assert len(groups) > 1
    for g in groups:
        assert set(g.obsm) == {"dense", "sparse"}
        assert set(g.layers) == {"counts", "twice"}  # every layer, by default
        np.testing.assert_array_equal(g.varm["loadings"], src.varm["loadings"])
        pd.testing.assert_frame_equal(g.var, src.var)
        assert_uns_equal(g.uns, src.uns)
    got = ad.concat(groups, merge="same")
    rows = pd.Index(got.obs_names).get_indexer(src.obs_names)
    for key in ("dense", "sparse"):
        assert_same_rows(got.obsm[key][rows], src.obsm[key])
    for key in ("counts", "twice"):
        assert_same_rows(got.layers[key][rows], src.layers[key])
    only = convert([path], tmp_path / "d.zarr", progress=False, layers=["twice"])
    assert set(groups_of(tmp_path / "d.zarr", only)[0].layers) == {"twice"}


def test_pbmc68k_legacy_obsm_raw_varm_uns(tmp_path, real_adata, caplog):
    """pbmc68k (anndata 0.6 layout): dense obsm, CSR raw with its var, varm, uns."""
    src = real_adata("pbmc68k")
    with caplog.at_level(logging.WARNING, logger="annserve.server.convert"):
        manifest = convert(
            [real_path("pbmc68k")], tmp_path / "c.zarr", progress=False, max_bucket_bytes=1 << 20
        )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "obsp/connectivities" in warned[0]
    assert "obsp/distances" in warned[0]
    groups = groups_of(tmp_path / "c.zarr", manifest)
    assert len(groups) > 1
    for g in groups:
        assert g.raw is not None
        pd.testing.assert_frame_equal(g.raw.var, src.raw.var)
        pd.testing.assert_frame_equal(g.var, src.var)
        np.testing.assert_array_equal(g.varm["PCs"], src.varm["PCs"])
        assert_uns_equal(g.uns, src.uns)
    whole = ad.concat(groups, merge="same")
    rows = pd.Index(whole.obs_names).get_indexer(src.obs_names)
    for key in ("X_pca", "X_umap"):
        assert_same_rows(whole.obsm[key][rows], src.obsm[key])
    raw_x = sp.vstack([g.raw.X for g in groups], format="csr")[rows]
    assert_same_rows(raw_x, src.raw.X)
    for column in src.obs.columns:
        got = whole.obs[column].iloc[rows]
        assert got.dtype == src.obs[column].dtype, column
        assert (got.to_numpy() == src.obs[column].to_numpy()).all(), column


def test_wu2020_obsm_var_uns(tmp_path, real_adata):
    src = real_adata("wu2020")
    manifest = convert([real_path("wu2020")], tmp_path / "c.zarr", progress=False)
    groups = groups_of(tmp_path / "c.zarr", manifest)
    whole = ad.concat(groups, merge="same")
    rows = pd.Index(whole.obs_names).get_indexer(src.obs_names)
    assert_same_rows(whole.obsm["X_umap_orig"][rows], src.obsm["X_umap_orig"])
    for g in groups:
        pd.testing.assert_frame_equal(g.var, src.var)
        assert_uns_equal(g.uns, src.uns)


def test_two_inputs_carry_what_both_hold(tmp_path, caplog):
    """Elements in only one input, or a varm over another gene space, are dropped and named."""
    first, second = generated(seed=0), generated(n_vars=30, seed=1)
    del second.layers["twice"]
    second.raw = second
    paths = [write_h5ad(tmp_path / "a.h5ad", first), write_h5ad(tmp_path / "b.h5ad", second)]
    with caplog.at_level(logging.WARNING, logger="annserve.server.convert"):
        manifest = convert(paths, tmp_path / "c.zarr", progress=False)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    by_input = {p: next(w for w in warned if str(p) in w) for p in paths}
    assert "layers/twice" in by_input[paths[0]]
    assert "varm/loadings" in by_input[paths[0]]
    assert "raw" in by_input[paths[1]]
    groups = groups_of(tmp_path / "c.zarr", manifest)
    for g in groups:
        assert set(g.layers) == {"counts"}
        assert set(g.obsm) == {"dense", "sparse"}
        assert not g.varm
        assert g.raw is None
        assert g.obs["count"].dtype == "Int64"
    whole = ad.concat(groups, merge="same")
    for src in (first, second):
        rows = pd.Index(whole.obs_names).get_indexer(src.obs_names)
        assert (rows >= 0).all()
        assert_same_rows(whole.obsm["sparse"][rows], src.obsm["sparse"])
        pd.testing.assert_series_equal(
            whole.obs["count"].iloc[rows], src.obs["count"], check_index=False
        )


def test_integer_column_missing_from_an_input_is_nullable(tmp_path):
    first, second = generated(seed=0), generated(seed=1)
    first.obs["plain"] = np.arange(first.n_obs)
    paths = [write_h5ad(tmp_path / "a.h5ad", first), write_h5ad(tmp_path / "b.h5ad", second)]
    manifest = convert(paths, tmp_path / "c.zarr", progress=False)
    whole = ad.concat(groups_of(tmp_path / "c.zarr", manifest), merge="same")
    assert whole.obs["plain"].dtype == "Int64"
    rows = pd.Index(whole.obs_names).get_indexer(first.obs_names)
    assert (whole.obs["plain"].iloc[rows].to_numpy() == np.arange(first.n_obs)).all()
    other = pd.Index(whole.obs_names).get_indexer(second.obs_names)
    assert whole.obs["plain"].iloc[other].isna().all()


@pytest.mark.parametrize("dense_x", [False, True])
def test_zarr_input_with_raw(tmp_path, dense_x):
    src = generated()
    if dense_x:
        src.X = src.X.toarray()
    src.raw = src
    with ad.settings.override(allow_write_nullable_strings=True):
        ad.io.write_elem(zarr.open_group(tmp_path / "in.zarr", mode="w"), "/", src)
    manifest = convert([tmp_path / "in.zarr"], tmp_path / "c.zarr", progress=False)
    groups = groups_of(tmp_path / "c.zarr", manifest)
    whole = ad.concat(groups, merge="same")
    rows = pd.Index(whole.obs_names).get_indexer(src.obs_names)
    assert_same_rows(sp.vstack([g.raw.X for g in groups], format="csr")[rows], src.raw.X)
    pd.testing.assert_frame_equal(groups[0].raw.var, src.raw.var)


def test_nan_in_float_column_stays_nan(tmp_path):
    src = generated()
    src.obs["score"] = np.where(np.arange(src.n_obs) % 3 == 0, np.nan, 1.5)
    path = write_h5ad(tmp_path / "gen.h5ad", src)
    manifest = convert([path], tmp_path / "c.zarr", progress=False)
    got = in_input_order(groups_of(tmp_path / "c.zarr", manifest), src.obs_names).obs
    assert got["score"].dtype == np.float64
    np.testing.assert_array_equal(got["score"].to_numpy(), src.obs["score"].to_numpy())
