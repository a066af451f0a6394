"""Map rows of one input into a collection's layout (see :mod:`annserve.server.convert.plan`).

Gene indices of X and layers go through the input's gene map, those of ``raw/X``
through its raw gene map (dropped genes removed under an inner join); rows whose
indices no longer increase are re-sorted; values are cast to the collection's dtypes;
obs columns are converted to the collection's column types, with a missing-value mask
for the nullable ones; obsm rows are cast to the collection's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from annserve.server.convert.plan import DATASET_COLUMN
from annserve.server.convert.rows import Ragged, RowBlock, encode_strings

if TYPE_CHECKING:
    from annserve.server.convert.obs import ColumnInfo, ObsColumn
    from annserve.server.convert.plan import Plan, SourceMap
    from annserve.server.convert.source import SourceBlock, SourceInfo


def to_rows(block: SourceBlock, plan: Plan, i: int) -> RowBlock:
    """Map rows of input ``i`` into the collection's gene spaces and obs types."""
    m = plan.maps[i]
    matrices = {k: _matrix(k, block.matrices[k], plan, m) for k in plan.dtypes}
    n = len(block.obs_names)
    columns, masks = {}, {}
    for spec in plan.columns:
        values, mask = _column(spec, block.columns.get(spec.name), plan.sources[i], m, n, i)
        columns[spec.name] = values
        if spec.nullable:
            masks[spec.name] = mask
    obsm = {k: _obsm(block.obsm[k], o.dtype) for k, o in plan.obsm.items()}
    return RowBlock(encode_strings(block.obs_names), matrices, columns, masks, obsm)


def _matrix(
    key: str, parts: tuple[np.ndarray, np.ndarray, np.ndarray], plan: Plan, m: SourceMap
) -> Ragged:
    """CSR rows of ``X``, a layer or ``raw/X`` in the collection's gene space."""
    n_cols, index_dtype = plan.space(key)
    genes = m.raw_genes if key == "raw/X" else m.genes
    assert genes is not None  # raw/X is read only when the plan carries raw
    drops = m.drops if key != "raw/X" else bool((genes < 0).any())
    return _remap(*parts, genes, drops, plan.dtypes[key], index_dtype, n_cols)


def _obsm(rows: np.ndarray | tuple[np.ndarray, ...], dtype: np.dtype) -> np.ndarray | Ragged:
    """Obsm rows in the collection's dtype: dense as they are, CSR as a :class:`Ragged`."""
    if isinstance(rows, np.ndarray):
        return rows.astype(dtype, copy=False)
    row_nnz, indices, data = rows
    return Ragged(row_nnz, (indices.astype(np.int32, copy=False), data.astype(dtype, copy=False)))


def _remap(
    row_nnz: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    gene_map: np.ndarray,
    drops: bool,
    dtype: np.dtype,
    index_dtype: np.dtype,
    n_vars: int,
) -> Ragged:
    genes = gene_map[indices]
    data = data.astype(dtype, copy=False)
    if drops:
        keep = genes >= 0
        kept = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept[1:])
        offsets = np.zeros(len(row_nnz) + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=offsets[1:])
        row_nnz = kept[offsets[1:]] - kept[offsets[:-1]]
        genes, data = genes[keep], data[keep]
    rows = Ragged(row_nnz, (genes.astype(index_dtype, copy=False), data))
    return rows if _rows_sorted(rows) else _sort_rows(rows, n_vars)


def _rows_sorted(rows: Ragged) -> bool:
    """Whether the column indices increase within every row."""
    genes = rows.values[0]
    if len(genes) < 2:
        return True
    step = np.diff(genes.astype(np.int64)) > 0
    boundaries = rows.offsets()[1:-1] - 1  # last value of a row, before the next row's first
    step[boundaries[(boundaries >= 0) & (boundaries < len(step))]] = True
    return bool(step.all())


def _sort_rows(rows: Ragged, n_vars: int) -> Ragged:
    row = np.repeat(np.arange(len(rows.lengths), dtype=np.int64), rows.lengths)
    order = np.argsort(row * n_vars + rows.values[0], kind="stable")
    return Ragged(rows.lengths, tuple(v[order] for v in rows.values))


def _column(
    spec: ColumnInfo, column: ObsColumn | None, source: SourceInfo, m: SourceMap, n: int, i: int
) -> tuple[np.ndarray | Ragged, np.ndarray]:
    """Rows of one obs column in the collection's type, and where they are missing."""
    if spec.name == DATASET_COLUMN:
        return np.full(n, i, dtype=np.int32), np.zeros(n, bool)
    if column is None:
        return _absent(spec, n), np.ones(n, bool)
    values = column.values
    mask = np.zeros(n, bool) if column.mask is None else column.mask
    if spec.kind == "numeric":
        out = values.astype(spec.dtype)
        if not spec.nullable and mask.any():  # a nullable integer joined into a float column
            out[mask] = np.nan
        return out, mask
    info = source.columns[spec.name]
    if spec.kind == "category":
        out = np.full(n, -1, dtype=np.int32)
        known = values >= 0
        out[known] = m.categories[spec.name][values[known]]
        return out, ~known
    if info.kind == "category":
        assert info.categories is not None  # a categorical column has categories
        labels = np.array([str(v) for v in info.categories] + [""], dtype=object)
        return encode_strings(labels[values]), values < 0  # code -1 picks the trailing ""
    return encode_strings(values), mask


def _absent(spec: ColumnInfo, n: int) -> np.ndarray | Ragged:
    """Rows of a column that the input lacks: NaN, 0 (masked), no category or ``""``."""
    if spec.kind == "numeric":
        assert spec.dtype is not None  # a numeric spec has a dtype
        return np.full(n, np.nan if spec.dtype.kind == "f" else 0, dtype=spec.dtype)
    if spec.kind == "category":
        return np.full(n, -1, dtype=np.int32)
    return encode_strings(np.full(n, "", dtype=object))
