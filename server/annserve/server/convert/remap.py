"""Map rows of one input into a collection's layout (see :mod:`annserve.server.convert.plan`).

Gene indices go through the input's gene map (dropped genes removed under an inner
join); rows whose indices no longer increase are re-sorted; values are cast to the
collection's dtypes; obs columns are converted to the collection's column types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from annserve.server.convert.plan import DATASET_COLUMN
from annserve.server.convert.rows import Ragged, RowBlock, encode_strings

if TYPE_CHECKING:
    from annserve.server.convert.obs import ColumnInfo
    from annserve.server.convert.plan import Plan, SourceMap
    from annserve.server.convert.source import SourceBlock, SourceInfo


def to_rows(block: SourceBlock, plan: Plan, i: int) -> RowBlock:
    """Map rows of input ``i`` into the collection's gene space and obs types."""
    m = plan.maps[i]
    matrices = {
        k: _remap(*parts, m, plan.dtypes[k], plan.index_dtype, plan.n_vars)
        for k, parts in block.matrices.items()
    }
    n = len(block.obs_names)
    columns = {
        spec.name: _column(spec, block.columns.get(spec.name), plan.sources[i], m, n, i)
        for spec in plan.columns
    }
    return RowBlock(encode_strings(block.obs_names), matrices, columns)


def _remap(
    row_nnz: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    m: SourceMap,
    dtype: np.dtype,
    index_dtype: np.dtype,
    n_vars: int,
) -> Ragged:
    genes = m.genes[indices]
    data = data.astype(dtype, copy=False)
    if m.drops:
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
    spec: ColumnInfo, values: np.ndarray | None, source: SourceInfo, m: SourceMap, n: int, i: int
) -> np.ndarray | Ragged:
    info = source.columns.get(spec.name)
    if spec.name == DATASET_COLUMN:
        return np.full(n, i, dtype=np.int32)
    if spec.kind == "numeric":
        return (
            np.full(n, np.nan, dtype=spec.dtype)
            if values is None
            else values.astype(spec.dtype, copy=False)
        )
    if spec.kind == "category":
        if values is None:
            return np.full(n, -1, dtype=np.int32)
        codes = values.astype(np.int64, copy=False)
        out = np.full(n, -1, dtype=np.int32)
        known = codes >= 0
        out[known] = m.categories[spec.name][codes[known]]
        return out
    if values is None:
        return encode_strings(np.full(n, "", dtype=object))
    if info is not None and info.kind == "category":
        labels = np.array([str(v) for v in info.categories] + [""], dtype=object)
        values = labels[values.astype(np.int64)]  # code -1 picks the trailing ""
    return encode_strings(values)
