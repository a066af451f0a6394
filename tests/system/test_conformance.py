"""Conformance: every row served equals anndata's own read of it, value for value.

A generator writes AnnData variants (X dtype x CSR/dense; obs of every pandas dtype
anndata writes, with missing values; layers; dense and sparse obsm; raw) in each
on-disk form annserve serves: h5ad, zarr v2, zarr v3 and an annbatch-layout
collection of several groups. One server serves them all; each is streamed whole
(shuffled, with ``dtype=None`` so nothing is cast) and every batch is compared, row by
row through obs_names, with ``anndata.read_h5ad`` / ``read_zarr`` of the same files.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from annserve.client import CSRArrays, Output, RemoteLoader
from annserve.errors import InvalidRequestError
from annserve.server import create_server, open_store
from annserve.server.convert.pipeline import convert
from conftest import real_path, stop_now

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VARS, N_RAW = 300, 40, 55
#: (layout, dtype) of X in each variant.
X_KINDS = [
    ("csr", "float32"),
    ("csr", "float64"),
    ("csr", "int64"),
    ("csr", "uint16"),
    ("csr", "uint8"),
    ("dense", "float32"),
    ("dense", "float64"),
    ("dense", "int32"),
]
FORMATS = ["h5ad", "zarr-v2", "zarr-v3", "annbatch"]
OBS_KEYS = [
    "count_nullable",
    "small_nullable",
    "flag_nullable",
    "barcode",
    "label",
    "stage",
    "cluster_id",
    "dose",
    "is_doublet",
    "n_genes",
    "score",
    "qc_pass",
    "note",
]


def _values(rng: np.random.Generator, shape: tuple[int, int], dtype: str) -> np.ndarray:
    """Values of a dtype, with non-integers that float32 cannot hold for float64."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        values = rng.random(shape) * 100 + 1e-9 * rng.random(shape)
        return values.astype(dtype)
    if dtype == "int32":  # signed values, some negative: nothing may narrow them
        return rng.integers(-1000, 1000, shape).astype(dtype)
    high = {"uint8": 255, "uint16": 60000}.get(dtype, 2**40)
    return rng.integers(0, high, shape).astype(dtype)


def _sparse(rng: np.random.Generator, shape: tuple[int, int], dtype: str) -> sp.csr_matrix:
    mask = rng.random(shape) < 0.2
    values = _values(rng, shape, dtype)
    values[~mask] = 0
    values[mask & (values == 0)] = 1  # every stored non-zero is non-zero
    return sp.csr_matrix(values)


def _obs(rng: np.random.Generator, n: int) -> pd.DataFrame:
    missing = rng.random(n) < 0.15
    counts = pd.array(rng.integers(0, 10**6, n), dtype="Int64")
    counts[missing] = pd.NA
    small = pd.array(rng.integers(0, 200, n), dtype="UInt8")
    small[rng.random(n) < 0.1] = pd.NA
    flag = pd.array(rng.random(n) < 0.5, dtype="boolean")
    flag[rng.random(n) < 0.2] = pd.NA
    barcode = pd.array([f"BC{i:06d}-1" for i in range(n)], dtype="string")
    barcode[missing] = pd.NA
    return pd.DataFrame(
        {
            "count_nullable": counts,
            "small_nullable": small,
            "flag_nullable": flag,
            "barcode": barcode,
            "label": pd.Categorical(
                rng.choice(["B", "T", "NK", None], n), categories=["T", "B", "NK"]
            ),
            "stage": pd.Categorical(
                rng.choice(["early", "mid", "late"], n),
                categories=["early", "mid", "late"],
                ordered=True,
            ),
            "cluster_id": pd.Categorical(rng.choice([0, 10, 20, 300], n)),
            "dose": pd.Categorical(rng.choice([0.5, 1.25, 2.0], n)),
            "is_doublet": pd.Categorical(rng.random(n) < 0.1),
            "n_genes": rng.integers(0, 5000, n).astype(np.int32),
            "score": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
            "qc_pass": rng.random(n) < 0.9,
            "note": np.array([f"cell {i}" for i in range(n)], dtype=object),
        },
        index=[f"cell-{i:05d}" for i in range(n)],
    )


def make_variant(layout: str, dtype: str, seed: int = 0) -> ad.AnnData:
    """An AnnData with X of ``layout``/``dtype`` and every element annserve serves."""
    rng = np.random.default_rng(seed)
    shape = (N_OBS, N_VARS)
    x = _sparse(rng, shape, dtype) if layout == "csr" else _values(rng, shape, dtype)
    adata = ad.AnnData(
        X=x,
        obs=_obs(rng, N_OBS),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(N_VARS)]),
        layers={"counts": _sparse(rng, shape, "float32")},
        obsm={
            "X_pca": rng.normal(size=(N_OBS, 7)).astype(np.float32),
            "X_umap": rng.normal(size=(N_OBS, 2)),
            "X_peaks": _sparse(rng, (N_OBS, 12), "float32"),
        },
    )
    adata.raw = ad.AnnData(
        X=_sparse(rng, (N_OBS, N_RAW), "float32"),
        var=pd.DataFrame(index=[f"raw{j}" for j in range(N_RAW)]),
    )
    return adata


def _write(adata: ad.AnnData, path: Path, form: str) -> None:
    """Write with anndata's own element writer (no string-to-categorical conversion)."""
    with ad.settings.override(allow_write_nullable_strings=True):
        if form == "h5ad":
            with h5py.File(path, "w") as f:
                ad.io.write_elem(f, "/", adata)
        elif form == "annbatch":  # groups of one zarr v3 collection, natural name order
            root = zarr.open_group(path, mode="w", zarr_format=3)
            for i, start in enumerate(range(0, adata.n_obs, 128)):
                ad.io.write_elem(root, f"dataset_{i}", adata[start : start + 128].copy())
            root.attrs.update(
                {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
            )
        else:
            root = zarr.open_group(path, mode="w", zarr_format=int(form[-1]))
            ad.io.write_elem(root, "/", adata)


def _reference(path: Path, form: str) -> ad.AnnData:
    """anndata's read of what was written: the truth every served row is checked against."""
    if form == "h5ad":
        return ad.read_h5ad(path)
    if form != "annbatch":
        return ad.read_zarr(path)
    root = zarr.open_group(path, mode="r")
    names = sorted(root.group_keys(), key=lambda k: int(k.split("_")[1]))
    parts = [ad.read_zarr(path / k) for k in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = ad.concat(parts, merge="same")
    whole.raw = ad.AnnData(
        X=sp.vstack([p.raw.X for p in parts], format="csr"), var=parts[0].raw.var
    )
    return whole


@pytest.fixture(scope="module")
def conformance(tmp_path_factory):
    """Every variant in every form, served by one server: ``(address, {name: reference})``."""
    root = tmp_path_factory.mktemp("conformance")
    stores, references = {}, {}
    for layout, dtype in X_KINDS:
        adata = make_variant(layout, dtype)
        for form in FORMATS:
            name = f"{layout}-{dtype}-{form}"
            path = root / (f"{name}.h5ad" if form == "h5ad" else f"{name}.zarr")
            _write(adata, path, form)
            stores[name] = open_store(path)
            references[name] = _reference(path, form)
    server, (port,) = create_server(stores, ["127.0.0.1:0"])
    try:
        yield f"127.0.0.1:{port}", references
    finally:
        stop_now(server)


def _epoch(address: str, store: str, **kwargs) -> list[dict]:
    loader = RemoteLoader(
        address,
        store=store,
        batch_size=64,
        chunk_size=16,
        preload_nchunks=4,
        seed=3,
        dtype=None,
        return_index=True,
        output=Output(to_torch=False),
        **kwargs,
    )
    return list(loader)


def _rows(x: CSRArrays | np.ndarray) -> np.ndarray:
    if isinstance(x, CSRArrays):
        return sp.csr_matrix((x.data, x.indices, x.indptr), shape=x.shape).toarray()
    return x


def _dense(x: object) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _check_rows(served: CSRArrays | np.ndarray, expected: object, dtype: np.dtype) -> None:
    values = _rows(served)
    assert values.dtype == dtype
    np.testing.assert_array_equal(values, _dense(expected))  # NaN equals NaN


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize(("layout", "dtype"), X_KINDS, ids=[f"{a}-{b}" for a, b in X_KINDS])
def test_every_row_equals_anndatas_read(conformance, layout, dtype, form):
    address, references = conformance
    name = f"{layout}-{dtype}-{form}"
    ref = references[name]
    batches = _epoch(address, name, obs_keys=OBS_KEYS, obsm_keys=["X_pca", "X_umap", "X_peaks"])
    seen = np.concatenate([b["index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(N_OBS))  # every row once
    for batch in batches:
        names = batch["obs"].index
        rows = ref.obs_names.get_indexer(names)
        np.testing.assert_array_equal(rows, batch["index"])  # obs_names name the rows
        assert isinstance(batch["X"], CSRArrays) == (layout == "csr")
        _check_rows(batch["X"], ref.X[rows], np.dtype(dtype))
        expected_obs = ref.obs.iloc[rows][OBS_KEYS]
        pd.testing.assert_frame_equal(batch["obs"], expected_obs, check_index_type=False)
        for key in ("X_pca", "X_umap", "X_peaks"):
            _check_rows(batch["obsm"][key], ref.obsm[key][rows], ref.obsm[key].dtype)


@pytest.mark.parametrize("form", FORMATS)
def test_layers_and_raw_equal_anndatas_read(conformance, form):
    address, references = conformance
    name = f"csr-float64-{form}"
    ref = references[name]
    for kwargs, expected, var_names in [
        ({"layer": "counts"}, ref.layers["counts"], ref.var_names),
        ({"use_raw": True}, ref.raw.X, ref.raw.var_names),
    ]:
        loader_names = RemoteLoader(
            address, store=name, batch_size=64, **kwargs, output=Output(to_torch=False)
        ).var_names
        assert loader_names == list(var_names)
        for batch in _epoch(address, name, **kwargs):
            rows = batch["index"]
            _check_rows(batch["X"], expected[rows], expected.dtype)


def test_a_raw_gene_subset_is_served_in_the_asked_order(conformance):
    address, references = conformance
    ref = references["csr-float32-zarr-v3"]
    genes = ["raw7", "raw0", "raw42"]
    batches = _epoch(address, "csr-float32-zarr-v3", use_raw=True, var_names=genes)
    columns = ref.raw.var_names.get_indexer(genes)
    for batch in batches:
        _check_rows(batch["X"], ref.raw.X[batch["index"]][:, columns], np.dtype("float32"))


@pytest.mark.parametrize("encoding", ["compact", "raw"])
def test_float64_is_lossless_and_dtype_chooses_the_output(conformance, encoding):
    from annserve.client import Connection

    address, references = conformance
    ref = references["csr-float64-h5ad"]
    common = {
        "store": "csr-float64-h5ad",
        "batch_size": 100,
        "shuffle": False,
        "connection": Connection(encoding=encoding),
        "output": Output(to_torch=False),
    }
    exact = list(RemoteLoader(address, dtype=None, **common))
    default = list(RemoteLoader(address, **common))
    x64 = np.vstack([_rows(b["X"]) for b in exact])
    x32 = np.vstack([_rows(b["X"]) for b in default])
    assert x64.dtype == np.float64
    np.testing.assert_array_equal(x64, ref.X.toarray())  # not rounded on the wire
    assert x32.dtype == np.float32  # torch's default, rounded once on the client
    np.testing.assert_array_equal(x32, ref.X.toarray().astype(np.float32))


def test_torch_output_keeps_obsm_and_the_chosen_dtype(conformance):
    import torch

    address, references = conformance
    ref = references["dense-float64-zarr-v2"]
    loader = RemoteLoader(
        address,
        store="dense-float64-zarr-v2",
        batch_size=50,
        shuffle=False,
        dtype="float64",
        obsm_keys=["X_pca", "X_peaks"],
    )
    batch = next(iter(loader))
    assert batch["X"].dtype == torch.float64
    np.testing.assert_array_equal(batch["X"].numpy(), ref.X[:50])
    assert batch["obsm"]["X_pca"].dtype == torch.float64
    np.testing.assert_array_equal(batch["obsm"]["X_pca"].numpy(), ref.obsm["X_pca"][:50])
    assert batch["obsm"]["X_peaks"].layout == torch.sparse_csr
    np.testing.assert_array_equal(
        batch["obsm"]["X_peaks"].to_dense().numpy(), ref.obsm["X_peaks"][:50].toarray()
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"obsm_keys": ["X_tsne"]}, "obsm_keys"),
        ({"use_raw": True, "layer": "counts"}, "use_raw"),
        ({"use_raw": True, "var_names": ["gene0"]}, "var_names"),
        ({"dtype": "U8"}, "dtype"),
    ],
)
def test_bad_fidelity_options_name_the_field(conformance, kwargs, field):
    address, _ = conformance
    with pytest.raises(InvalidRequestError, match=field):
        RemoteLoader(address, store="csr-float32-h5ad", **kwargs)


def _same_rows(served: CSRArrays | np.ndarray, expected: object) -> None:
    """Compare sparse rows without densifying them (real datasets have ~33k genes)."""
    if isinstance(served, CSRArrays):
        got = sp.csr_matrix((served.data, served.indices, served.indptr), shape=served.shape)
        diff = got - sp.csr_matrix(expected)
        assert diff.count_nonzero() == 0
        assert got.dtype == expected.dtype
    else:
        np.testing.assert_array_equal(served, expected)
        assert served.dtype == expected.dtype


@pytest.mark.parametrize("name", ["pbmc3k", "mouse10x", "wu2020", "pbmc68k"])
def test_real_datasets_equal_anndatas_read(serve, real_adata, name):
    path = real_path(name)
    ref = real_adata(name)
    address = serve(path)
    kwargs = {"obs_keys": list(ref.obs.columns), "obsm_keys": list(ref.obsm)}
    batches = _epoch(address, path.name, **kwargs)
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(ref.n_obs))
    for batch in batches:
        rows = batch["index"]
        _same_rows(batch["X"], ref.X[rows])
        pd.testing.assert_frame_equal(batch["obs"], ref.obs.iloc[rows], check_index_type=False)
        for key, values in ref.obsm.items():
            _same_rows(batch["obsm"][key], np.asarray(values)[rows])
    if ref.raw is not None:  # pbmc68k: dense scaled X, log-normalised CSR raw
        for batch in _epoch(address, path.name, use_raw=True):
            _same_rows(batch["X"], ref.raw.X[batch["index"]])


@pytest.mark.parametrize("variant", ["csr-float64", "csr-uint16", "dense-float32", "dense-int32"])
def test_a_converted_collection_serves_what_its_input_holds(tmp_path, serve, variant):
    """``annserve convert`` shuffles rows and stores X as narrow CSR; values stay equal."""
    layout, dtype = variant.split("-")
    source = tmp_path / "input.h5ad"
    _write(make_variant(layout, dtype), source, "h5ad")
    ref = ad.read_h5ad(source)
    out = tmp_path / "converted.zarr"
    convert([source], out, progress=False, max_bucket_bytes=1 << 16)
    address = serve(out)
    obsm = ["X_pca", "X_umap", "X_peaks"]
    for kwargs, expected in [({}, ref.X), ({"use_raw": True}, ref.raw.X)]:
        batches = _epoch(address, out.name, obs_keys=OBS_KEYS, obsm_keys=obsm, **kwargs)
        names = np.concatenate([b["obs"].index.to_numpy() for b in batches])
        assert sorted(names) == sorted(ref.obs_names)  # every cell once, found by name
        for batch in batches:
            rows = ref.obs_names.get_indexer(batch["obs"].index)
            np.testing.assert_array_equal(_rows(batch["X"]), _dense(expected[rows]))
            pd.testing.assert_frame_equal(
                batch["obs"], ref.obs.iloc[rows][OBS_KEYS], check_index_type=False
            )
            for key in obsm:
                _check_rows(batch["obsm"][key], ref.obsm[key][rows], ref.obsm[key].dtype)
