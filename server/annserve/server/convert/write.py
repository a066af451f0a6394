"""Writing a collection: one AnnData zarr group per bucket, and the manifest last.

Each group holds obs, var, varm, uns and dense obsm (written by anndata), and its CSR
matrices: X, layers, ``raw/X`` (next to ``raw/var``) and CSR obsm elements.

X, layers and ``raw/X`` are CSR elements of the anndata on-disk format (``encoding-type``
``csr_matrix``, written here rather than with :func:`anndata.io.write_elem`, which would
widen the indices), their ``data``, ``indices`` and ``indptr`` arrays chunked for
contiguous row reads (about :data:`CHUNK_CELLS` cells' worth of non-zeros per chunk, at
least :data:`MIN_CHUNK_VALUES` values) and sharded (about :data:`SHARD_BYTES`
uncompressed per shard), compressed with Blosc LZ4 and byte shuffle, as annbatch writes
them. Narrow dtypes, to read fewer bytes per non-zero: ``indices`` in the plan's index
dtype (uint16 up to 65,536 genes), ``indptr`` int64, and ``data`` as uint16 when a
group's values of that matrix are all integers in ``[0, 65535]`` (counts; lossless, see
:func:`narrow_counts`), else in the plan's dtype.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import UnstableSpecificationWarning

from annserve.server.convert.manifest import GroupEntry
from annserve.server.convert.rows import Ragged, decode_strings
from annserve.server.format import ANNBATCH_MARKER, MANIFEST_KEY, lossless_cast
from annserve.server.io._zarr import ZARRS_PIPELINE

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from pathlib import Path

    from annserve.server.convert.manifest import Manifest
    from annserve.server.convert.plan import Plan
    from annserve.server.convert.rows import RowBlock

logger = logging.getLogger(__name__)

#: Cells' worth of non-zeros per chunk of ``data``/``indices``.
CHUNK_CELLS = 48
#: Smallest chunk, values (keeps very sparse matrices from getting tiny chunks).
MIN_CHUNK_VALUES = 4096
#: Target uncompressed size of a shard, bytes.
SHARD_BYTES = 64 << 20
#: Prefix of the group names, as in annbatch's collections (``dataset_0``, ...).
GROUP_PREFIX = "dataset_"
#: dtype of integer counts on disk (unless ``--keep-dtype``).
COUNTS_DTYPE = np.dtype(np.uint16)
#: Values cast and checked at once by :func:`narrow_counts` (early exit on a loss).
CHECK_VALUES = 1 << 20


#: Codecs of the written matrices by ``--compression`` name. Serving reads decode every
#: chunk: uncompressed stores take half the daemon's read CPU of LZ4 ones, ~2x the disk.
COMPRESSORS = {
    "lz4": (BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),),
    "zstd": (ZstdCodec(level=3),),
    "none": None,
}


def csr_kwargs(nnz: int, n_rows: int, itemsize: int, compression: str = "lz4") -> dict[str, Any]:
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


def narrow_counts(data: np.ndarray) -> np.ndarray | None:
    """Return ``data`` as uint16 if that keeps every value exactly, else None.

    Parameters
    ----------
    data
        Values of one matrix (any shape), e.g. a CSR ``data`` array.

    Returns
    -------
    A uint16 copy of ``data`` when its dtype is an integer or float type wider than 2
    bytes and every value is an integer in ``[0, 65535]`` (raw counts, whatever their
    dtype), the values unchanged; None otherwise (negative, fractional, NaN or infinite
    values, larger counts, or a dtype of 2 bytes or less, already as narrow).
    """
    if data.dtype.kind not in "uif" or data.dtype.itemsize <= COUNTS_DTYPE.itemsize:
        return None
    return lossless_cast(data, COUNTS_DTYPE, block=CHECK_VALUES)


def write_group(root: zarr.Group, index: int, rows: RowBlock, plan: Plan) -> GroupEntry:
    """Write rows as the AnnData group ``dataset_<index>`` of ``root``.

    The group holds obs (nullable columns as pandas nullable arrays), var, varm, uns,
    obsm and, when the plan carries raw, ``raw`` (``raw/X``, ``raw/var``). Each of X,
    the layers and ``raw/X`` is a CSR element with ``indices`` of its gene space's index
    dtype (:meth:`Plan.space`) and ``int64`` ``indptr``; CSR obsm elements keep their
    dtype, with int32 ``indices``. A matrix's values are stored as uint16 when they are
    all integers in ``[0, 65535]`` and ``plan.keep_dtype`` is False (see
    :func:`narrow_counts`; the values are unchanged, and :func:`anndata.read_zarr` reads
    the matrix back as uint16), else in ``plan.dtypes[key]``. The check is per group and
    per matrix: groups of one collection may differ.

    Returns
    -------
    The group's manifest entry.
    """
    name = f"{GROUP_PREFIX}{index}"
    n = rows.n_rows
    dense = {k: v for k, v in rows.obsm.items() if not isinstance(v, Ragged)}
    skeleton = ad.AnnData(
        obs=_obs_frame(rows, plan), var=plan.var, obsm=dense, varm=plan.varm, uns=plan.uns
    )
    with _settings(), warnings.catch_warnings():
        # cells of different inputs may share a name; the dataset column tells them apart
        warnings.filterwarnings("ignore", "Observation names are not unique", UserWarning)
        # uns may hold structured arrays (e.g. scanpy's rank_genes_groups), carried as is
        # though zarr v3 has no specification for them yet
        warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)
        ad.io.write_elem(root, name, skeleton)
        group = _group(root[name])
        if plan.raw_var is not None:
            del group["raw"]  # anndata's "null" element for the skeleton's absent raw
            raw = group.create_group("raw")
            raw.attrs.update({"encoding-type": "raw", "encoding-version": "0.1.0"})
            ad.io.write_elem(raw, "var", plan.raw_var)
            ad.io.write_elem(raw, "varm", {})
    with _settings(), zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
        for key, matrix in rows.matrices.items():
            _write_matrix(group, key, matrix, plan)
        for key, rows_of_key in rows.obsm.items():
            if isinstance(rows_of_key, Ragged):
                indices, data = rows_of_key.values
                _write_csr(
                    _group(group["obsm"]),
                    key,
                    (n, plan.obsm[key].tail[0]),
                    (data, indices, rows_of_key.offsets()),
                    csr_kwargs(
                        len(data), n, max(data.itemsize, indices.itemsize), plan.compression
                    ),
                )
    logger.debug("wrote %s: %d cells", name, n)
    return GroupEntry(name, n, int(rows.matrices["X"].lengths.sum()))


def _write_matrix(group: zarr.Group, key: str, matrix: Ragged, plan: Plan) -> None:
    """Write ``X``, a layer or ``raw/X`` of a group, narrowed as :func:`write_group` says."""
    n_cols, index_dtype = plan.space(key)
    indices, data = matrix.values
    indices = np.asarray(indices, dtype=index_dtype)
    data = np.asarray(data, dtype=plan.dtypes[key])
    narrow = None if plan.keep_dtype else narrow_counts(data)
    if narrow is not None:
        data = narrow
    n = len(matrix.lengths)
    parent, _, leaf = key.rpartition("/")  # "X", "layers/<name>" or "raw/X"
    _write_csr(
        _group(group[parent]) if parent else group,
        leaf,
        (n, n_cols),
        (data, indices, matrix.offsets()),
        csr_kwargs(len(data), n, max(data.itemsize, indices.itemsize), plan.compression),
    )


def _settings() -> AbstractContextManager[None]:
    """Return the settings of the writes: zarr v3, explicit chunks and shards only."""
    options: dict[str, Any] = {"zarr_write_format": 3, "allow_write_nullable_strings": True}
    if "auto_shard_zarr_v3" in dir(ad.settings):  # not in every 0.12.x; unset, it warns
        options["auto_shard_zarr_v3"] = False
    return ad.settings.override(**options)


def _write_csr(
    parent: zarr.Group,
    name: str,
    shape: tuple[int, int],
    arrays: tuple[np.ndarray, np.ndarray, np.ndarray],
    kwargs: dict[str, Any],
) -> None:
    """Write a CSR element (anndata on-disk format 0.1.0) with the arrays' dtypes as given.

    ``arrays`` are ``data``, ``indices`` and ``indptr``; ``kwargs`` those of
    :func:`csr_kwargs`, for each array.
    """
    group = parent.create_group(name)
    group.attrs.update(
        {
            "encoding-type": "csr_matrix",
            "encoding-version": "0.1.0",
            "shape": [int(shape[0]), int(shape[1])],
        }
    )
    for key, values in zip(("data", "indices", "indptr"), arrays, strict=True):
        array = group.create_array(key, shape=values.shape, dtype=values.dtype, **kwargs)
        array[...] = values


def _group(node: object) -> zarr.Group:
    """Return ``node``, a group this module wrote (an AnnData group or its ``layers``)."""
    assert isinstance(node, zarr.Group)  # written by anndata as a group
    return node


def _obs_frame(rows: RowBlock, plan: Plan) -> pd.DataFrame:
    """Obs of a group: categoricals, numeric, str and pandas nullable columns."""
    columns: dict[str, Any] = {}
    for spec in plan.columns:
        values = rows.columns[spec.name]
        if spec.kind == "category" and not isinstance(values, Ragged):  # codes, never ragged
            columns[spec.name] = pd.Categorical.from_codes(
                values, dtype=pd.CategoricalDtype(spec.categories, ordered=spec.ordered)
            )
            continue
        array = decode_strings(values) if isinstance(values, Ragged) else values
        if spec.nullable:  # Int*/UInt*/boolean (pd.array's choice for numpy values) or string
            nullable = pd.array(array, dtype="string" if spec.kind == "str" else None)
            nullable[rows.masks[spec.name]] = pd.NA
            columns[spec.name] = nullable
        else:
            columns[spec.name] = array
    return pd.DataFrame(columns, index=pd.Index(decode_strings(rows.obs_names)))


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Store the manifest (and annbatch's marker) in the root attributes; consolidate metadata.

    Call it after every group is written: a store without it is not a collection.
    """
    root = zarr.open_group(path, mode="r+")
    root.attrs.update({**ANNBATCH_MARKER, MANIFEST_KEY: manifest.to_json()})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        warnings.filterwarnings("ignore", category=UnstableSpecificationWarning)  # see above
        zarr.consolidate_metadata(path)
