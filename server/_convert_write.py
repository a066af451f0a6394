"""Writing a collection: one AnnData zarr group per bucket, and the manifest last.

X and layers are CSR written with :func:`anndata.io.write_elem`, their ``data``,
``indices`` and ``indptr`` arrays chunked for contiguous row reads (about
:data:`CHUNK_CELLS` cells' worth of non-zeros per chunk, at least
:data:`MIN_CHUNK_VALUES` values) and sharded (about :data:`SHARD_BYTES` uncompressed
per shard), compressed with Blosc LZ4 and byte shuffle, as annbatch writes them.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from annserve.server._convert_manifest import ANNBATCH_MARKER, MANIFEST_KEY, GroupEntry
from annserve.server._convert_rows import Ragged, decode_strings
from annserve.server.ranges import ZARRS_PIPELINE

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

    from annserve.server._convert_manifest import Manifest
    from annserve.server._convert_plan import Plan
    from annserve.server._convert_rows import RowBlock

logger = logging.getLogger(__name__)

#: Cells' worth of non-zeros per chunk of ``data``/``indices``.
CHUNK_CELLS = 48
#: Smallest chunk, values (keeps very sparse matrices from getting tiny chunks).
MIN_CHUNK_VALUES = 4096
#: Target uncompressed size of a shard, bytes.
SHARD_BYTES = 64 << 20
#: Prefix of the group names, as in annbatch's collections (``dataset_0``, ...).
GROUP_PREFIX = "dataset_"


#: Codecs of the written matrices by ``--compression`` name. Serving reads decode every
#: chunk: uncompressed stores serve about twice as fast as LZ4 ones, ~3x the disk.
COMPRESSORS = {"lz4": (BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),),
               "zstd": (ZstdCodec(level=3),), "none": None}


def csr_kwargs(nnz: int, n_rows: int, itemsize: int, compression: str = "lz4"
               ) -> dict[str, Any]:
    """Arguments of the zarr arrays of one CSR matrix's arrays.

    Parameters
    ----------
    nnz
        Stored values.
    n_rows
        Rows.
    itemsize
        Bytes per value of the widest array (``data`` or ``indices``).
    compression
        A key of :data:`COMPRESSORS`.

    Returns
    -------
    ``chunks``, ``shards`` (both 1-tuples, values) and ``compressors``.
    """
    per_row = nnz / max(n_rows, 1)
    chunk = max(MIN_CHUNK_VALUES, round(CHUNK_CELLS * per_row))
    per_shard = max(1, SHARD_BYTES // (chunk * itemsize))
    shard = chunk * min(per_shard, max(1, math.ceil(nnz / chunk)))
    return {"chunks": (chunk,), "shards": (shard,), "compressors": COMPRESSORS[compression]}


def write_group(root: zarr.Group, index: int, rows: RowBlock, plan: Plan) -> GroupEntry:
    """Write rows as the AnnData group ``dataset_<index>`` of ``root``.

    Returns
    -------
    The group's manifest entry.
    """
    name = f"{GROUP_PREFIX}{index}"
    n = rows.n_rows
    with _settings(), warnings.catch_warnings():
        # cells of different inputs may share a name; the dataset column tells them apart
        warnings.filterwarnings("ignore", "Observation names are not unique", UserWarning)
        ad.io.write_elem(root, name, ad.AnnData(obs=_obs_frame(rows, plan), var=plan.var))
        group = root[name]
    with _settings(), zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        for key, matrix in rows.matrices.items():
            csr = _csr(matrix, n, plan.n_vars)
            itemsize = max(csr.data.itemsize, csr.indices.itemsize)
            parent, _, leaf = key.rpartition("/")  # "X" or "layers/<name>"
            ad.io.write_elem(group[parent] if parent else group, leaf, csr,
                             dataset_kwargs=csr_kwargs(csr.nnz, n, itemsize, plan.compression))
    logger.debug("wrote %s: %d cells", name, n)
    return GroupEntry(name, n, int(rows.matrices["X"].lengths.sum()))


def _settings() -> AbstractContextManager[None]:
    """Return the settings of the writes: zarr v3, explicit chunks and shards only."""
    options: dict[str, Any] = {"zarr_write_format": 3}
    if "auto_shard_zarr_v3" in dir(ad.settings):  # not in every 0.12.x; unset, it warns
        options["auto_shard_zarr_v3"] = False
    return ad.settings.override(**options)


def _csr(matrix: Ragged, n_rows: int, n_vars: int) -> sp.csr_matrix:
    indices, data = matrix.values
    return sp.csr_matrix((data, indices, matrix.offsets()), shape=(n_rows, n_vars))


def _obs_frame(rows: RowBlock, plan: Plan) -> pd.DataFrame:
    columns: dict[str, Any] = {}
    for spec in plan.columns:
        values = rows.columns[spec.name]
        if spec.kind == "category":
            columns[spec.name] = pd.Categorical.from_codes(
                values, categories=pd.Index(spec.categories), ordered=spec.ordered)
        elif isinstance(values, Ragged):
            columns[spec.name] = decode_strings(values)
        else:
            columns[spec.name] = values
    return pd.DataFrame(columns, index=pd.Index(decode_strings(rows.obs_names)))


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Store the manifest (and annbatch's marker) in the root attributes; consolidate metadata.

    Call it after every group is written: a store without it is not a collection.
    """
    root = zarr.open_group(path, mode="r+")
    root.attrs.update({**ANNBATCH_MARKER, MANIFEST_KEY: manifest.to_json()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(path)

