"""Collections in annbatch's ``DatasetCollection`` on-disk layout, written without annbatch.

The layout (annbatch 0.3, ``DatasetCollection.add_adatas`` + ``write_sharded``):

- a zarr v3 root group whose attributes are
  ``{"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}``, written
  after the groups;
- children ``dataset_0``, ``dataset_1``, ... (read in the numeric order of the suffix),
  each a complete AnnData zarr group of ``dataset_size`` cells (the last one shorter);
- the inputs outer-joined on var (``anndata.concat(join="outer")``: the sorted union of
  the gene names when they differ), obs names made unique, and a categorical obs column
  ``src_path`` whose categories are the input paths as given;
- rows shuffled (annbatch permutes blocks of ``shuffle_chunk_size`` rows, then the rows of
  each dataset in memory);
- X CSR with ``data``, ``indices`` (smallest integer dtype, e.g. uint16 below 65,536 genes)
  and ``indptr`` chunked at ``n_obs_per_chunk`` (64) cells' worth of non-zeros and
  sharded (at most ``shard_size``, clamped to the array), Blosc LZ4 (clevel 3, byte
  shuffle); metadata consolidated after each group.

annbatch reads the inputs lazily, so its categorical obs columns come out as (nullable)
strings; this helper keeps them categorical. Servers should not rely on either.

Use the ``annbatch_collection`` fixture (import it into a test module or conftest), or
:func:`write_annbatch_collection` for other inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.codecs import BloscCodec

from conftest import real_path

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

ANNBATCH_MARKER = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}


@dataclass(frozen=True)
class AnnbatchCollection:
    """A written collection and what it holds.

    Attributes
    ----------
    path
        The collection (zarr v3 directory).
    adata
        All its cells in memory, in collection order (groups concatenated).
    group_sizes
        Cells of ``dataset_0``, ``dataset_1``, ...
    """

    path: Path
    adata: ad.AnnData
    group_sizes: tuple[int, ...]


def write_annbatch_collection(
    path: Path,
    adatas: Sequence[ad.AnnData],
    src_paths: Sequence[str],
    *,
    dataset_size: int,
    shuffle: bool = True,
    seed: int = 0,
    n_obs_per_chunk: int = 64,
) -> AnnbatchCollection:
    """Write in-memory AnnData objects as an annbatch-layout collection at ``path``."""
    parts = []
    for i, adata in enumerate(adatas):
        part = ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var)
        part.obs["src_path"] = pd.Categorical.from_codes(
            np.full(part.n_obs, i), categories=list(src_paths)
        )
        parts.append(part)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Observation names are not unique", UserWarning)
        whole = ad.concat(parts, join="outer")
        whole.obs_names_make_unique()
    if shuffle:
        whole = whole[np.random.default_rng(seed).permutation(whole.n_obs)].copy()
    root = zarr.open_group(path, mode="w", zarr_format=3)
    sizes = []
    for i, start in enumerate(range(0, whole.n_obs, dataset_size)):
        chunk = whole[start : start + dataset_size].copy()
        _write_sharded(root, f"dataset_{i}", chunk, n_obs_per_chunk)
        sizes.append(chunk.n_obs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
            zarr.consolidate_metadata(root.store)
    root.update_attributes(ANNBATCH_MARKER)
    return AnnbatchCollection(path, whole, tuple(sizes))


def _write_sharded(root: zarr.Group, key: str, adata: ad.AnnData, n_obs_per_chunk: int) -> None:
    nnz = adata.X.nnz
    chunk = max(1, min(int(n_obs_per_chunk * nnz / adata.n_obs), nnz))
    shard = max(chunk, nnz - nnz % chunk)
    kwargs = {
        "chunks": (chunk,),
        "shards": (shard,),
        "compressors": (BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),),
    }
    with ad.settings.override(
        zarr_write_format=3,
        auto_shard_zarr_v3=False,
        write_csr_csc_indices_with_min_possible_dtype=True,
    ):
        ad.io.write_elem(root, key, ad.AnnData(obs=adata.obs, var=adata.var))
        ad.io.write_elem(root[key], "X", adata.X, dataset_kwargs=kwargs)


@pytest.fixture(scope="session")
def annbatch_collection(tmp_path_factory, real_adata) -> AnnbatchCollection:
    """pbmc3k (first 1,000 cells) and wu2020 (200 cells) in three shuffled groups of <= 500."""
    pbmc = real_adata("pbmc3k")[:1000].copy()
    wu = real_adata("wu2020")
    path = tmp_path_factory.mktemp("annbatch") / "collection.zarr"
    return write_annbatch_collection(
        path, [pbmc, wu], [str(real_path("pbmc3k")), str(real_path("wu2020"))], dataset_size=500
    )
