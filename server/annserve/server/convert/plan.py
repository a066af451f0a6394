"""The joined layout of a collection: gene space, var, obs column types, per-input maps.

Gene order: ``outer`` lists the genes of the first input in its order, then each later
input's genes not seen before, in that input's order (first-seen order); ``inner``
keeps the first input's order, restricted to genes present in every input. var keeps
the columns present in every input, each gene's values taken from the first input that
has the gene.

obs columns: all-numeric columns get numpy's common type (float64 when some input
lacks the column, the missing rows NaN); all-categorical columns get the union of the
categories in first-seen order (missing rows have no category; ordered only when every
input has the same ordered categories); any other mix of categorical and string columns
becomes a string column (missing rows ``""``). A column numeric in one input and not in
another is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from annserve.errors import StoreFormatError
from annserve.server.convert.obs import ColumnInfo
from annserve.server.convert.rows import Ragged, RowBlock

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annserve.server.convert.source import SourceInfo

logger = logging.getLogger(__name__)

#: obs column recording each cell's input (its label).
DATASET_COLUMN = "dataset"


@dataclass(frozen=True, slots=True)
class SourceMap:
    """How one input's rows map into the collection.

    Attributes
    ----------
    genes
        Collection gene of each input gene, shape ``(n_vars_input,)``, int64, -1 = dropped.
    drops
        Whether some input genes are dropped (inner join).
    monotone
        Whether kept genes keep their relative order (sorted rows stay sorted).
    categories
        Per categorical column: collection code of each input category, int32.
    """

    genes: np.ndarray
    drops: bool
    monotone: bool
    categories: dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything needed to turn input rows into collection rows.

    Attributes
    ----------
    var
        Collection var (index: gene names, in collection order).
    columns
        obs columns of the collection, ``dataset`` last.
    dtypes
        Value dtype of each matrix (``"X"``, ``"layers/<name>"``) in memory (the inputs'
        common type); groups store it unless their values narrow (see ``keep_dtype``).
    index_dtype
        dtype of CSR column indices, in memory and on disk: uint16 up to 65,536 genes,
        else int32 (int64 past 2**31 - 1 genes).
    maps
        One per input, in input order.
    sources
        The inputs, in input order.
    compression
        Codec of the written matrices: ``"lz4"`` (Blosc LZ4, byte shuffle, as annbatch),
        ``"zstd"`` or ``"none"``.
    keep_dtype
        Write every matrix's values in :attr:`dtypes`. False: a group's matrix whose
        values are all integers in ``[0, 65535]`` is written as uint16 instead (lossless;
        see :func:`annserve.server.convert.write.narrow_counts`).
    """

    var: pd.DataFrame
    columns: tuple[ColumnInfo, ...]
    dtypes: dict[str, np.dtype]
    index_dtype: np.dtype
    maps: tuple[SourceMap, ...]
    sources: tuple[SourceInfo, ...]
    compression: str = "lz4"
    keep_dtype: bool = False

    @property
    def n_vars(self) -> int:
        """Genes of the collection."""
        return len(self.var)

    def empty_block(self) -> RowBlock:
        """Return a zero-row block with the collection's layout and dtypes."""
        no_str = Ragged(np.zeros(0, np.int64), (np.zeros(0, np.uint8),))
        matrices = {
            k: Ragged(np.zeros(0, np.int64), (np.zeros(0, self.index_dtype), np.zeros(0, d)))
            for k, d in self.dtypes.items()
        }
        columns = {
            c.name: no_str
            if c.kind == "str"
            else np.zeros(0, np.int32 if c.kind == "category" else c.dtype)
            for c in self.columns
        }
        return RowBlock(no_str, matrices, columns)


def build_plan(
    sources: Sequence[SourceInfo], var_join: str, obs_columns: Sequence[str] | None
) -> Plan:
    """Join the inputs' gene spaces and obs columns.

    Raises
    ------
    StoreFormatError
        If the inner join leaves no gene, a requested obs column exists in no input,
        a column is numeric in some inputs only, or an input has a ``dataset`` column.
    """
    names = _join_names([s.var.index for s in sources], var_join)
    joined = pd.Index(names)
    maps = []
    columns = _obs_specs(sources, obs_columns)
    for s in sources:
        genes = joined.get_indexer(s.var.index.astype(str)).astype(np.int64)
        kept = genes[genes >= 0]
        maps.append(
            SourceMap(
                genes,
                bool((genes < 0).any()),
                bool(np.all(np.diff(kept) > 0)),
                _category_maps(s, columns),
            )
        )
    dtypes = {
        k: np.result_type(*(s.matrices[k].dtype for s in sources)) for k in sources[0].matrices
    }
    # the narrowest index type (as annbatch writes): half the bytes to read for < 65,536 genes
    index_dtype = np.dtype(
        np.uint16 if len(names) <= 1 << 16 else np.int32 if len(names) < 2**31 else np.int64
    )
    return Plan(
        _join_var(sources, joined), tuple(columns), dtypes, index_dtype, tuple(maps), tuple(sources)
    )


def _join_names(indexes: list[pd.Index], var_join: str) -> list[str]:
    if var_join == "outer":
        seen: dict[str, None] = {}
        for index in indexes:
            seen.update(dict.fromkeys(index.astype(str)))
        return list(seen)
    common = set(indexes[0].astype(str)).intersection(*(set(i.astype(str)) for i in indexes[1:]))
    names = [n for n in indexes[0].astype(str) if n in common]
    if not names:
        msg = "the inputs have no gene in common (var_join='inner')"
        raise StoreFormatError(msg)
    return names


def _join_var(sources: Sequence[SourceInfo], joined: pd.Index) -> pd.DataFrame:
    """Var of the collection: shared columns, values from the first input with the gene."""
    keep = [c for c in sources[0].var.columns if all(c in s.var.columns for s in sources)]
    owner_pos = np.full(len(joined), -1, dtype=np.int64)
    pieces = []
    for s in sources:
        genes = joined.get_indexer(s.var.index.astype(str))
        new = np.flatnonzero((genes >= 0) & (owner_pos[np.maximum(genes, 0)] < 0))
        owner_pos[genes[new]] = 0
        part = s.var.iloc[new][keep].copy()
        part.index = joined[genes[new]]
        pieces.append(part)
    var = pd.concat(pieces).reindex(joined) if keep else pd.DataFrame(index=joined)
    for c in keep:
        types = {type(s.var[c].dtype) for s in sources}
        if types == {pd.CategoricalDtype}:
            var[c] = var[c].astype("category")
        elif var[c].dtype == object:
            var[c] = var[c].astype(str)
    var.index.name = None
    return var


def _obs_specs(
    sources: Sequence[SourceInfo], obs_columns: Sequence[str] | None
) -> list[ColumnInfo]:
    for s in sources:
        if DATASET_COLUMN in s.columns and (obs_columns is None or DATASET_COLUMN in obs_columns):
            msg = (
                f"{s.path}: has an obs column {DATASET_COLUMN!r}, which convert adds to "
                "record each cell's input; leave it out with --obs-columns"
            )
            raise StoreFormatError(msg)
    if obs_columns is None:
        names = list(dict.fromkeys(c for s in sources for c in s.columns))
    else:
        names = list(dict.fromkeys(obs_columns))
        for name in names:
            if not any(name in s.columns for s in sources):
                msg = (
                    f"obs column {name!r} is in no input "
                    f"({', '.join(str(s.path) for s in sources)})"
                )
                raise StoreFormatError(msg)
    specs = [_unify(n, [s.columns.get(n) for s in sources], sources) for n in names]
    labels = tuple(s.label for s in sources)
    return [*specs, ColumnInfo(DATASET_COLUMN, "category", categories=labels)]


def _unify(name: str, infos: list[ColumnInfo | None], sources: Sequence[SourceInfo]) -> ColumnInfo:
    present = [c for c in infos if c is not None]
    kinds = {c.kind for c in present}
    missing = len(present) < len(infos)
    if kinds == {"numeric"}:
        dtype = np.result_type(*(c.dtype for c in present))
        if missing and dtype.kind in "biu":
            dtype = np.dtype(np.float64)
        return ColumnInfo(name, "numeric", dtype)
    if "numeric" in kinds:
        numeric = [
            str(s.path)
            for s, c in zip(sources, infos, strict=True)
            if c is not None and c.kind == "numeric"
        ]
        msg = (
            f"obs column {name!r} is numeric in {', '.join(numeric)} but not in the other "
            "inputs; leave it out with --obs-columns"
        )
        raise StoreFormatError(msg)
    if kinds != {"category"}:
        return ColumnInfo(name, "str")
    labels = [c.categories for c in present]
    if len({type(v) for cats in labels for v in cats}) > 1:
        labels = [tuple(str(v) for v in cats) for cats in labels]
    union = tuple(dict.fromkeys(v for cats in labels for v in cats))
    ordered = not missing and all(c.ordered and c.categories == union for c in present)
    return ColumnInfo(name, "category", categories=union, ordered=ordered)


def _category_maps(source: SourceInfo, columns: list[ColumnInfo]) -> dict[str, np.ndarray]:
    out = {}
    for spec in columns:
        info = source.columns.get(spec.name)
        if spec.kind == "category" and info is not None:
            union = pd.Index(spec.categories)
            cast = union.dtype == object and any(not isinstance(v, str) for v in info.categories)
            labels = [str(v) for v in info.categories] if cast else list(info.categories)
            out[spec.name] = union.get_indexer(pd.Index(labels, dtype=union.dtype)).astype(np.int32)
    return out
