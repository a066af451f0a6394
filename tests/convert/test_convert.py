"""``annserve convert``: round trips on real data, determinism, layers, bad inputs, memory bound."""

from __future__ import annotations

import shutil
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import annserve.server.convert.passes as passes
import annserve.server.convert.pipeline as convert_module
import annserve.server.convert.write as write_module
from annserve.errors import InvalidRequestError, StoreFormatError, StoreNotFoundError
from annserve.server.convert import (
    OutputExistsError,
    convert,
    convert_main,
    read_manifest,
)
from annserve.server.io.store import open_store
from annserve.server.rpc.cli import main as cli_main
from collection_stores import ANNBATCH_MARKER, annbatch_collection  # noqa: F401 (a fixture)
from conftest import real_path

if TYPE_CHECKING:
    from pathlib import Path

    from annserve.server.convert import Manifest

SMALL_BUCKET = 8 << 20  # bytes: pbmc3k + wu2020 (~14 MB in memory) in 3 groups
WU_BUCKET = 512 << 10  # bytes: wu2020 (~1.2 MB in memory with uint16 indices) in 3 groups


def load(path: Path, manifest: Manifest) -> ad.AnnData:
    """The whole collection in memory, each group read with anndata.read_zarr."""
    groups = [ad.read_zarr(path / g.name) for g in manifest.groups]
    for a, g in zip(groups, manifest.groups, strict=True):
        assert a.shape == (g.n_obs, manifest.n_vars)
        assert a.X.nnz == g.nnz
    obs = pd.concat([a.obs for a in groups])
    x = sp.vstack([a.X for a in groups], format="csr")
    layers = {k: sp.vstack([a.layers[k] for a in groups], format="csr") for k in groups[0].layers}
    return ad.AnnData(X=x, obs=obs, var=groups[0].var, layers=layers)


def joined_names(adatas: list[ad.AnnData], how: str) -> list[str]:
    """The documented gene order: first-seen (outer) or the first input's order (inner)."""
    if how == "outer":
        return list(dict.fromkeys(n for a in adatas for n in a.var_names))
    common = set.intersection(*(set(a.var_names) for a in adatas))
    return [n for n in adatas[0].var_names if n in common]


def in_joined_space(x: sp.csr_matrix, names: pd.Index, joined: pd.Index) -> sp.csr_matrix:
    """Input counts with columns moved to the joined gene space (dropped genes removed)."""
    cols = joined.get_indexer(names)
    coo = x.tocoo()
    keep = cols[coo.col] >= 0
    return sp.csr_matrix(
        (coo.data[keep], (coo.row[keep], cols[coo.col][keep])), shape=(x.shape[0], len(joined))
    )


def rows_of(coll: ad.AnnData, label: str, obs_names: pd.Index) -> np.ndarray:
    """Collection rows of one input's cells, in the input's order."""
    mine = np.flatnonzero(coll.obs["dataset"].to_numpy() == label)
    return mine[pd.Index(coll.obs_names[mine]).get_indexer(obs_names)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert pbmc3k + wu2020 once per set of options; returns ``(path, manifest)``."""
    cache: dict[tuple, tuple[Path, Manifest]] = {}

    def get(var_join: str = "outer", seed: int = 0, shuffle: bool = True, copy: int = 0):
        key = (var_join, seed, shuffle, copy)
        if key not in cache:
            out = tmp_path_factory.mktemp("converted") / "collection.zarr"
            manifest = convert(
                [real_path("pbmc3k"), real_path("wu2020")],
                out,
                var_join=var_join,
                seed=seed,
                shuffle=shuffle,
                progress=False,
                max_bucket_bytes=SMALL_BUCKET,
            )
            cache[key] = (out, manifest)
        return cache[key]

    return get


@pytest.mark.parametrize("var_join", ["outer", "inner"])
def test_round_trip_every_cell_once_with_its_counts(converted, real_adata, var_join):
    path, manifest = converted(var_join)
    inputs = {
        "pbmc3k_raw.h5ad": real_adata("pbmc3k"),
        "wu2020_200_counts.h5ad": real_adata("wu2020"),
    }
    joined = pd.Index(joined_names(list(inputs.values()), var_join))
    assert manifest == read_manifest(path)
    assert (manifest.n_obs, manifest.n_vars) == (2900, len(joined))
    assert len(manifest.groups) > 1
    assert [s.n_obs for s in manifest.sources] == [2700, 200]
    coll = load(path, manifest)
    assert list(coll.var_names) == list(joined)
    assert coll.obs["dataset"].cat.categories.tolist() == list(inputs)
    keys = pd.MultiIndex.from_arrays([coll.obs["dataset"].astype(str), coll.obs_names])
    assert keys.is_unique
    for label, src in inputs.items():
        rows = rows_of(coll, label, src.obs_names)
        assert (rows >= 0).all()
        expected = in_joined_space(src.X, src.var_names, joined)
        assert (coll.X[rows] != expected).nnz == 0
    dataset = coll.obs["dataset"].cat.codes.to_numpy()
    assert (np.diff(dataset) != 0).sum() > 10  # shuffled: the inputs are interleaved


def test_obs_values_and_categories_preserved(converted, real_adata):
    path, manifest = converted("outer")
    coll = load(path, manifest)
    wu, pbmc = real_adata("wu2020"), real_adata("pbmc3k")
    assert list(coll.obs.columns) == [*pbmc.obs.columns, *wu.obs.columns, "dataset"]
    wu_rows = rows_of(coll, "wu2020_200_counts.h5ad", wu.obs_names)
    pbmc_rows = rows_of(coll, "pbmc3k_raw.h5ad", pbmc.obs_names)
    for col in wu.obs.columns:
        got = coll.obs[col]
        assert got.cat.categories.tolist() == wu.obs[col].cat.categories.tolist()
        assert (got.iloc[wu_rows].to_numpy() == wu.obs[col].to_numpy()).all()
        assert got.iloc[pbmc_rows].isna().all()
    barcode = coll.obs["barcode"].to_numpy()
    assert (barcode[pbmc_rows] == pbmc.obs["barcode"].to_numpy()).all()
    assert (barcode[wu_rows] == "").all()
    # var columns shared by all inputs, values from the first input with the gene
    assert list(coll.var.columns) == ["gene_ids"]
    first = pbmc.var["gene_ids"].reindex(coll.var_names)
    from_wu = first.isna()
    assert (coll.var["gene_ids"][~from_wu] == first[~from_wu]).all()
    assert (
        coll.var["gene_ids"][from_wu] == wu.var["gene_ids"].reindex(coll.var_names[from_wu])
    ).all()


def test_same_seed_same_order_other_seed_other_order(tmp_path):
    def order(seed: int, name: str) -> pd.Index:
        manifest = convert(
            [real_path("wu2020")],
            tmp_path / name,
            seed=seed,
            progress=False,
            max_bucket_bytes=2 * WU_BUCKET,
        )
        assert len(manifest.groups) > 1
        return load(tmp_path / name, manifest).obs_names

    first = order(0, "a.zarr")
    assert (order(0, "b.zarr") == first).all()
    assert not (order(1, "c.zarr") == first).all()


def test_no_shuffle_keeps_input_order(converted, real_adata):
    path, manifest = converted("outer", shuffle=False)
    coll = load(path, manifest)
    expected = [*real_adata("pbmc3k").obs_names, *real_adata("wu2020").obs_names]
    assert list(coll.obs_names) == expected
    assert not manifest.shuffle


def write_h5ad(path: Path, adata: ad.AnnData) -> Path:
    with warnings.catch_warnings():  # some tests write duplicate names on purpose
        warnings.filterwarnings("ignore", ".*names are not unique", UserWarning)
        adata.write_h5ad(path)
    return path


def test_layers_round_trip(tmp_path, real_adata):
    wu = real_adata("wu2020").copy()
    wu.layers["counts"] = wu.X.copy()
    wu.X = wu.X.astype(np.float32) * 0.5
    pbmc = real_adata("pbmc3k")[:300].copy()
    pbmc.layers["counts"] = pbmc.X.copy()
    inputs = [write_h5ad(tmp_path / "wu.h5ad", wu), write_h5ad(tmp_path / "pbmc.h5ad", pbmc)]
    manifest = convert(inputs, tmp_path / "c.zarr", layers=["counts"], progress=False)
    assert manifest.layers == ("counts",)
    coll = load(tmp_path / "c.zarr", manifest)
    joined = coll.var_names
    for label, src in {"wu.h5ad": wu, "pbmc.h5ad": pbmc}.items():
        rows = rows_of(coll, label, src.obs_names)
        assert (
            coll.layers["counts"][rows]
            != in_joined_space(src.layers["counts"], src.var_names, joined)
        ).nnz == 0
        assert (coll.X[rows] != in_joined_space(src.X, src.var_names, joined)).nnz == 0


def test_dense_legacy_input(tmp_path, real_adata):
    """pbmc68k: dense X, pre-0.7 obs; zeros are dropped, every other value kept."""
    src = real_adata("pbmc68k")
    manifest = convert([real_path("pbmc68k")], tmp_path / "c.zarr", progress=False)
    coll = load(tmp_path / "c.zarr", manifest)
    rows = rows_of(coll, "pbmc68k_reduced.h5ad", src.obs_names)
    assert np.array_equal(coll.X[rows].toarray(), src.X)
    assert (
        coll.obs["bulk_labels"].iloc[rows].to_numpy() == src.obs["bulk_labels"].to_numpy()
    ).all()
    assert np.allclose(coll.obs["n_counts"].iloc[rows], src.obs["n_counts"])


def test_cli_converts_and_daemon_flags_unchanged(tmp_path, capsys):
    out = tmp_path / "c.zarr"
    code = cli_main(
        [
            "convert",
            str(real_path("wu2020")),
            "-o",
            str(out),
            "--seed",
            "3",
            "--no-progress",
            "--obs-columns",
            "patient,batch",
        ]
    )
    assert code == 0
    manifest = read_manifest(out)
    assert (manifest.seed, manifest.obs_columns) == (3, ("patient", "batch", "dataset"))
    assert "200 cells" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli_main(["--port", "x"])  # the daemon's parser still handles everything else
    assert e.value.code == 2


@pytest.fixture
def wu_copy(tmp_path, real_adata):
    def make(name: str = "wu.h5ad") -> Path:
        return write_h5ad(tmp_path / name, real_adata("wu2020"))

    return make


def test_truncated_and_foreign_inputs(tmp_path, wu_copy, capsys):
    good = wu_copy()
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(np.random.default_rng(0).bytes(10_000))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["values"] = np.arange(10)
    for bad in (truncated, junk, foreign, tmp_path / "missing.h5ad"):
        code = convert_main([str(good), str(bad), "-o", str(tmp_path / "c.zarr"), "--no-progress"])
        assert code == 3
        assert str(bad) in capsys.readouterr().err
        assert not (tmp_path / "c.zarr").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["wu.h5ad", "truncated.h5ad", "junk.h5ad", "foreign.h5"]
    )


def test_inconsistent_inputs_named(tmp_path, wu_copy, real_adata):
    short_obs = wu_copy("short_obs.h5ad")
    with h5py.File(short_obs, "r+") as f:
        names = f["obs/_index"].asstr()[:150]
        del f["obs/_index"]
        f.create_dataset("obs/_index", data=names, dtype=h5py.string_dtype())
        f["obs/_index"].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    dup = real_adata("wu2020").copy()
    dup.var_names = [*dup.var_names[:-1], dup.var_names[0]]
    dup_path = write_h5ad(tmp_path / "dup.h5ad", dup)
    cases = [
        (short_obs, (), "150"),
        (dup_path, (), "not unique"),
        (wu_copy(), ("counts",), "layer 'counts'"),
    ]
    for path, layers, words in cases:
        with pytest.raises(StoreFormatError, match=words) as e:
            convert([path], tmp_path / "c.zarr", layers=layers, progress=False)
        assert str(path) in str(e.value)


def test_bad_arguments(tmp_path, wu_copy):
    good = wu_copy()
    for kwargs in ({"var_join": "left"}, {"seed": -1}, {"max_bucket_bytes": 0}):
        with pytest.raises(InvalidRequestError):
            convert([good], tmp_path / "c.zarr", progress=False, **kwargs)
    with pytest.raises(InvalidRequestError, match="not one string"):
        convert([good], tmp_path / "c.zarr", layers="counts", progress=False)
    with pytest.raises(InvalidRequestError, match="twice"):
        convert([good, good], tmp_path / "c.zarr", progress=False)
    assert convert_main([str(good), "-o", str(tmp_path / "c.zarr"), "--seed", "-2"]) == 2
    with pytest.raises(SystemExit) as e:
        convert_main([str(good), "-o", str(tmp_path / "c.zarr"), "--var-join", "left"])
    assert e.value.code == 2


def test_existing_output_needs_overwrite(tmp_path, wu_copy):
    good, out = wu_copy(), tmp_path / "c.zarr"
    out.mkdir()
    (out / "precious").write_text("keep me")
    assert convert_main([str(good), "-o", str(out), "--no-progress"]) == 5
    with pytest.raises(OutputExistsError):
        convert([good], out, progress=False)
    assert (out / "precious").read_text() == "keep me"
    assert convert_main([str(good), "-o", str(out), "--overwrite", "--no-progress"]) == 0
    assert read_manifest(out).n_obs == 200
    assert not (out / "precious").exists()


def test_interrupted_conversion_leaves_nothing(tmp_path, wu_copy, monkeypatch):
    good, out = wu_copy(), tmp_path / "c.zarr"
    calls = []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    real_write = passes.write_group
    monkeypatch.setattr(passes, "write_group", fail_second)
    with pytest.raises(KeyboardInterrupt):
        convert([good], out, progress=False, max_bucket_bytes=WU_BUCKET)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wu.h5ad"]
    with pytest.raises(StoreNotFoundError):
        read_manifest(out)


def test_killed_conversion_leaves_no_collection(tmp_path, wu_copy, monkeypatch):
    """A kill before the manifest (simulated: no cleanup) leaves a hidden non-collection."""
    good, out = wu_copy(), tmp_path / "c.zarr"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(convert_module, "write_manifest", killed)
        m.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
        with pytest.raises(KeyboardInterrupt):
            convert([good], out, progress=False)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "wu.h5ad"]
    assert not out.exists()
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(".annserve-convert-")
    with pytest.raises(StoreFormatError, match="no 'annserve' manifest"):
        read_manifest(leftovers[0] / "collection")


def test_read_manifest_detects_foreign_and_truncated(tmp_path, wu_copy, zarr_stores):
    with pytest.raises(StoreNotFoundError):
        read_manifest(tmp_path / "nothing.zarr")
    with pytest.raises(StoreFormatError, match="not a zarr group"):
        read_manifest(wu_copy())
    with pytest.raises(StoreFormatError, match="not an annserve collection"):
        read_manifest(zarr_stores("wu2020", 3))  # a plain AnnData zarr store
    out = tmp_path / "c.zarr"
    manifest = convert([wu_copy()], out, progress=False, max_bucket_bytes=WU_BUCKET)
    assert len(manifest.groups) > 2
    root = zarr.open_group(out, mode="r+", use_consolidated=False)
    tampered = manifest.to_json()
    tampered["groups"][1]["n_obs"] += 1
    tampered["n_obs"] += 1
    root.attrs["annserve"] = tampered
    with pytest.raises(StoreFormatError, match="dataset_1"):
        read_manifest(out)
    root.attrs["annserve"] = manifest.to_json()
    assert read_manifest(out) == manifest
    shutil.rmtree(out / manifest.groups[-1].name)
    with pytest.raises(StoreFormatError, match="missing"):
        read_manifest(out)


def test_memory_bounded_by_bucket_size(tmp_path, monkeypatch):
    """Rows held at once (a pass-1 block, a pass-2 bucket) stay under max_bucket_bytes."""
    rng = np.random.default_rng(0)
    n_obs, n_vars = 3000, 200
    x = sp.random(n_obs, n_vars, density=0.05, format="csr", dtype=np.float32, random_state=rng)
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], n_obs))},
        index=[f"cell{i}" for i in range(n_obs)],
    )
    src = write_h5ad(tmp_path / "gen.h5ad", ad.AnnData(X=x, obs=obs))
    held: dict[str, list[int]] = {"block": [], "group": []}
    real_to_rows, real_write = passes.to_rows, passes.write_group

    def to_rows(*args):
        block = real_to_rows(*args)
        held["block"].append(block.nbytes)
        return block

    def write_group(root, index, rows, plan):
        held["group"].append(rows.nbytes)
        return real_write(root, index, rows, plan)

    monkeypatch.setattr(passes, "to_rows", to_rows)
    monkeypatch.setattr(passes, "write_group", write_group)
    bucket = 64 << 10
    manifest = convert([src], tmp_path / "c.zarr", progress=False, max_bucket_bytes=bucket)
    total = sum(held["group"])
    assert manifest.n_obs == n_obs
    assert len(manifest.groups) >= total // bucket
    assert max(held["group"]) <= bucket
    assert max(held["block"]) <= bucket // 8


def test_annbatch_layout_fixture(annbatch_collection):  # noqa: F811 (the imported fixture)
    """The fixture the serving tests use: annbatch's layout, not an annserve collection."""
    path = annbatch_collection.path
    root = zarr.open_group(path, mode="r")
    assert dict(root.attrs) == ANNBATCH_MARKER
    names = [f"dataset_{i}" for i in range(len(annbatch_collection.group_sizes))]
    assert sorted(root.group_keys()) == names
    groups = [ad.read_zarr(path / n) for n in names]
    assert [g.n_obs for g in groups] == list(annbatch_collection.group_sizes) == [500, 500, 200]
    whole = annbatch_collection.adata
    assert (sp.vstack([g.X for g in groups]) != whole.X).nnz == 0
    assert root["dataset_0/X/indices"].dtype == np.uint16
    assert groups[0].obs["src_path"].cat.categories.tolist() == [
        str(real_path("pbmc3k")),
        str(real_path("wu2020")),
    ]
    with pytest.raises(StoreFormatError, match="not an annserve collection"):
        read_manifest(path)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_compression_choice(tmp_path, real_adata, compression):
    out = tmp_path / "c.zarr"
    manifest = convert([real_path("wu2020")], out, progress=False, compression=compression)
    group = zarr.open_group(out / manifest.groups[0].name, mode="r")
    compressors = group["X/data"].compressors
    assert (compressors == ()) if compression == "none" else (len(compressors) == 1)
    back = ad.read_zarr(out / manifest.groups[0].name)
    assert back.n_obs == real_adata("wu2020").n_obs
    with pytest.raises(InvalidRequestError, match="compression"):
        convert([real_path("wu2020")], tmp_path / "d.zarr", progress=False, compression="gzip")


def stored_dtypes(path: Path, manifest: Manifest, key: str = "X") -> set[tuple[str, str, str]]:
    """The on-disk ``(data, indices, indptr)`` dtypes of a matrix, over all groups."""
    root = zarr.open_group(path, mode="r")
    return {
        tuple(str(root[f"{g.name}/{key}/{a}"].dtype) for a in ("data", "indices", "indptr"))
        for g in manifest.groups
    }


def test_integer_counts_stored_as_uint16(converted, real_adata):
    """pbmc3k + wu2020 (float32 raw counts): uint16 values and indices, values exact."""
    path, manifest = converted("outer")
    assert len(manifest.groups) > 1
    assert stored_dtypes(path, manifest) == {("uint16", "uint16", "int64")}
    coll = load(path, manifest)
    assert coll.X.dtype == np.uint16  # (scipy's vstack widens the indices in memory)
    joined = coll.var_names
    for label, name in {"pbmc3k_raw.h5ad": "pbmc3k", "wu2020_200_counts.h5ad": "wu2020"}.items():
        src = real_adata(name)
        rows = rows_of(coll, label, src.obs_names)
        got = coll.X[rows]
        want = in_joined_space(src.X, src.var_names, joined)
        got.sort_indices()
        want.sort_indices()
        assert np.array_equal(got.indptr, want.indptr)
        assert np.array_equal(got.indices, want.indices)
        assert np.array_equal(got.data, want.data)  # exact, compared as floats


def test_uint16_collection_served_by_open_store(tmp_path, real_adata):
    """mouse10x (1,000 genes, counts): the daemon's reader sees uint16 X, the same values."""
    out = tmp_path / "c.zarr"
    manifest = convert(
        [real_path("mouse10x")], out, progress=False, shuffle=False, max_bucket_bytes=1 << 20
    )
    assert len(manifest.groups) > 1
    assert stored_dtypes(path=out, manifest=manifest) == {("uint16", "uint16", "int64")}
    store = open_store(out)
    assert store.x_dtype == np.uint16
    src = real_adata("mouse10x")
    rows = np.arange(0, src.n_obs, 7, dtype=np.int64)
    got = store.read_rows(rows)
    assert got.data.dtype == np.uint16
    assert got.indices.dtype == np.uint16
    back = sp.csr_matrix((got.data, got.indices, got.indptr), shape=(len(rows), src.n_vars))
    assert (back != src.X[rows]).nnz == 0


def test_float_values_keep_their_dtype(tmp_path, real_adata):
    """pbmc68k (scaled floats) stays float32, float64 non-integers stay float64."""
    manifest = convert([real_path("pbmc68k")], tmp_path / "a.zarr", progress=False)
    assert stored_dtypes(tmp_path / "a.zarr", manifest) == {("float32", "uint16", "int64")}
    coll = load(tmp_path / "a.zarr", manifest)
    src = real_adata("pbmc68k")
    assert coll.X.dtype == np.float32
    assert np.array_equal(
        coll.X[rows_of(coll, "pbmc68k_reduced.h5ad", src.obs_names)].toarray(), src.X
    )
    wu = real_adata("wu2020").copy()
    wu.X = wu.X.astype(np.float64) / 3
    manifest = convert([write_h5ad(tmp_path / "wu.h5ad", wu)], tmp_path / "b.zarr", progress=False)
    assert stored_dtypes(tmp_path / "b.zarr", manifest) == {("float64", "uint16", "int64")}
    coll = load(tmp_path / "b.zarr", manifest)
    assert (coll.X[rows_of(coll, "wu.h5ad", wu.obs_names)] != wu.X).nnz == 0


def test_mixed_groups_and_layers_narrowed_separately(tmp_path, real_adata):
    """Each group and matrix on its own: counts narrow, non-integers (in order) do not."""
    wu = real_adata("wu2020").copy()
    wu.layers["counts"] = wu.X.copy()
    wu.X = wu.X.astype(np.float64)
    wu.X.data[wu.X.indptr[150] :] += 0.25  # the last 50 cells are not counts
    path = write_h5ad(tmp_path / "wu.h5ad", wu)
    out = tmp_path / "c.zarr"
    manifest = convert(
        [path], out, layers=["counts"], shuffle=False, progress=False, max_bucket_bytes=WU_BUCKET
    )
    root = zarr.open_group(out, mode="r")
    x_types = [str(root[f"{g.name}/X/data"].dtype) for g in manifest.groups]
    assert x_types[0] == "uint16"
    assert x_types[-1] == "float64"
    assert stored_dtypes(out, manifest, "layers/counts") == {("uint16", "uint16", "int64")}
    coll = load(out, manifest)
    assert (coll.X != wu.X).nnz == 0
    assert (coll.layers["counts"] != wu.layers["counts"]).nnz == 0
    got = open_store(out).read_rows(np.arange(wu.n_obs, dtype=np.int64))
    back = sp.csr_matrix((got.data, got.indices, got.indptr), shape=wu.shape)
    assert (back != wu.X).nnz == 0


def test_keep_dtype_keeps_input_dtype(tmp_path, real_adata):
    out = tmp_path / "c.zarr"
    assert (
        convert_main([str(real_path("wu2020")), "-o", str(out), "--keep-dtype", "--no-progress"])
        == 0
    )
    manifest = read_manifest(out)
    assert stored_dtypes(out, manifest) == {("float32", "uint16", "int64")}
    coll = load(out, manifest)
    src = real_adata("wu2020")
    assert coll.X.dtype == np.float32
    assert (coll.X[rows_of(coll, "wu2020_200_counts.h5ad", src.obs_names)] != src.X).nnz == 0
    default = tmp_path / "d.zarr"
    assert convert_main([str(real_path("wu2020")), "-o", str(default), "--no-progress"]) == 0
    assert stored_dtypes(default, read_manifest(default)) == {("uint16", "uint16", "int64")}


@pytest.mark.parametrize(
    ("values", "narrows"),
    [
        (np.array([0, 1, 7, 65535], np.float32), True),
        (np.array([0, 3, 65535], np.int64), True),
        (np.array([0.0, -0.0, 2.0], np.float64), True),
        (np.array([], np.float32), True),
        (np.array([1, 65536], np.float32), False),
        (np.array([1, -1], np.int32), False),
        (np.array([1, 2.5], np.float32), False),
        (np.array([1, np.nan], np.float32), False),
        (np.array([1, np.inf], np.float64), False),
        (np.array([1, 2], np.uint8), False),  # already narrower
        (np.array([1, 2], np.float16), False),  # as narrow
        (np.array([True, False]), False),
    ],
)
def test_narrow_counts(values, narrows, monkeypatch):
    monkeypatch.setattr(write_module, "CHECK_VALUES", 2)  # several pieces
    out = write_module.narrow_counts(values)
    assert (out is not None) == narrows
    if narrows:
        assert out.dtype == np.uint16
        assert np.array_equal(out, values)
