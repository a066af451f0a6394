"""The joined layout of a collection: gene spaces, var, obs column types, what is carried.

Gene order: ``outer`` lists the genes of the first input in its order, then each later
input's genes not seen before, in that input's order (first-seen order); ``inner``
keeps the first input's order, restricted to genes present in every input. var keeps
the columns present in every input, each gene's values taken from the first input that
has the gene.

obs columns: all-numeric columns get numpy's common type; they are pandas nullable
(``Int*``/``UInt*``/``boolean``, missing rows ``pd.NA``) when some input's column is,
or when some input lacks an integer or bool column; float columns mark missing rows
NaN. All-categorical columns get the union of the categories in first-seen order, with
their dtype (integer categories stay integers; categories of mixed types become str;
missing rows have no category; ordered only when every input has the same ordered
categories). Any other mix of categorical and string columns becomes a string column,
``string`` (missing rows ``pd.NA``) when some input's column is, else object str
(missing rows ``""``). A column numeric in one input and not in another is an error.

Besides X and obs (see :mod:`annserve.server.convert.carry` for what each input holds):
layers, ``raw`` and each obsm element are carried when every input has them (raw's
genes joined like var, raw/var from the first input with the gene; an obsm element
needs the same kind and width everywhere); varm when every input's var names equal the
collection's and its values agree; uns is merged with ``anndata.concat``'s
``uns_merge="same"`` (one input: a copy). Everything else is listed per input in
:attr:`Plan.dropped`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from annserve.errors import StoreFormatError
from annserve.server.convert.obs import ColumnInfo
from annserve.server.convert.rows import Ragged, RowBlock

if TYPE_CHECKING:
    from annserve.server.convert.carry import ObsmInfo

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
    raw_genes
        Collection raw gene of each input raw gene, as ``genes``; None without raw.
    """

    genes: np.ndarray
    drops: bool
    monotone: bool
    categories: dict[str, np.ndarray]
    raw_genes: np.ndarray | None = None


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
        Value dtype of each matrix (``"X"``, ``"layers/<name>"``, ``"raw/X"``) in memory
        (the inputs' common type); groups store it unless their values narrow (see
        ``keep_dtype``).
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
    obsm
        obsm elements carried, by key (dtype: the inputs' common type).
    varm
        varm carried, by key, shapes ``(n_vars, ...)``.
    uns
        uns of every group.
    raw_var
        var of ``raw`` (index: its genes, in collection order); None without raw.
    dropped
        Per input, in input order: the elements it holds that are not carried.
    """

    var: pd.DataFrame
    columns: tuple[ColumnInfo, ...]
    dtypes: dict[str, np.dtype]
    index_dtype: np.dtype
    maps: tuple[SourceMap, ...]
    sources: tuple[SourceInfo, ...]
    compression: str = "lz4"
    keep_dtype: bool = False
    obsm: dict[str, ObsmInfo] = field(default_factory=dict)
    varm: dict[str, Any] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)
    raw_var: pd.DataFrame | None = None
    dropped: tuple[tuple[str, ...], ...] = ()

    @property
    def n_vars(self) -> int:
        """Genes of the collection."""
        return len(self.var)

    def space(self, key: str) -> tuple[int, np.dtype]:
        """Columns and CSR index dtype of a matrix: ``raw/X`` has raw's genes."""
        if key == "raw/X" and self.raw_var is not None:
            return len(self.raw_var), index_dtype_for(len(self.raw_var))
        return self.n_vars, self.index_dtype

    def empty_block(self) -> RowBlock:
        """Return a zero-row block with the collection's layout and dtypes."""
        no_str = Ragged(np.zeros(0, np.int64), (np.zeros(0, np.uint8),))
        matrices = {k: _no_rows(self.space(k)[1], d) for k, d in self.dtypes.items()}
        columns = {
            c.name: no_str
            if c.kind == "str"
            else np.zeros(0, np.int32 if c.kind == "category" else c.dtype)
            for c in self.columns
        }
        masks = {c.name: np.zeros(0, bool) for c in self.columns if c.nullable}
        obsm = {
            k: _no_rows(np.dtype(np.int32), o.dtype)
            if o.sparse
            else np.zeros((0, *o.tail), o.dtype)
            for k, o in self.obsm.items()
        }
        return RowBlock(no_str, matrices, columns, masks, obsm)


def _no_rows(index_dtype: np.dtype, dtype: np.dtype) -> Ragged:
    return Ragged(np.zeros(0, np.int64), (np.zeros(0, index_dtype), np.zeros(0, dtype)))


def index_dtype_for(n_columns: int) -> np.dtype:
    """Return the narrowest CSR index dtype for ``n_columns`` columns (as annbatch writes).

    uint16 up to 65,536 columns (half the bytes to read), int32 below 2**31, else int64.
    """
    return np.dtype(
        np.uint16 if n_columns <= 1 << 16 else np.int32 if n_columns < 2**31 else np.int64
    )


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
    joined = pd.Index(_join_names([s.var.index for s in sources], var_join))
    columns = _obs_specs(sources, obs_columns)
    keys = [k for k in sources[0].matrices if all(k in s.matrices for s in sources)]
    raw_vars = [s.extras.raw_var for s in sources]
    raw_joined = None
    if "raw/X" in keys and all(v is not None for v in raw_vars):
        raw_joined = pd.Index(_join_names([v.index for v in raw_vars if v is not None], var_join))
    maps = []
    for s in sources:
        genes = joined.get_indexer(s.var.index.astype(str)).astype(np.int64)
        kept = genes[genes >= 0]
        raw_var = s.extras.raw_var
        maps.append(
            SourceMap(
                genes,
                bool((genes < 0).any()),
                bool(np.all(np.diff(kept) > 0)),
                _category_maps(s, columns),
                None
                if raw_joined is None or raw_var is None
                else raw_joined.get_indexer(raw_var.index.astype(str)).astype(np.int64),
            )
        )
    dtypes = {k: np.result_type(*(s.matrices[k].dtype for s in sources)) for k in keys}
    plan = Plan(
        _join_var([s.var for s in sources], joined),
        tuple(columns),
        dtypes,
        index_dtype_for(len(joined)),
        tuple(maps),
        tuple(sources),
        obsm=_join_obsm(sources),
        varm=_join_varm(sources, joined),
        uns=_merge_uns(sources),
        raw_var=None if raw_joined is None else _join_var(raw_vars, raw_joined),
    )
    return replace(plan, dropped=tuple(_dropped(s, plan) for s in sources))


def _join_obsm(sources: Sequence[SourceInfo]) -> dict[str, ObsmInfo]:
    """Obsm elements in every input with the same kind and width, in the common dtype."""
    out = {}
    for key, first in sources[0].extras.obsm.items():
        infos = [s.extras.obsm.get(key) for s in sources]
        if all(i is not None and (i.sparse, i.tail) == (first.sparse, first.tail) for i in infos):
            dtype = np.result_type(*(i.dtype for i in infos if i is not None))
            out[key] = replace(first, dtype=dtype)
    return out


def _join_varm(sources: Sequence[SourceInfo], joined: pd.Index) -> dict[str, Any]:
    """Varm elements of inputs whose var names are the collection's, equal in all inputs."""
    if not all(s.var.index.astype(str).equals(joined) for s in sources):
        return {}
    first = sources[0].extras.varm
    return {
        k: v
        for k, v in first.items()
        if all(k in s.extras.varm and _equal(s.extras.varm[k], v) for s in sources[1:])
    }


def _equal(a: object, b: object) -> bool:
    """Whether two arrays (or DataFrames) hold the same values, NaN equal to NaN."""
    x, y = np.asarray(a), np.asarray(b)
    floats = x.dtype.kind == "f" and y.dtype.kind == "f"
    return x.shape == y.shape and np.array_equal(x, y, equal_nan=floats)


def _merge_uns(sources: Sequence[SourceInfo]) -> dict[str, Any]:
    """Uns of the collection: a copy of the only input's, else anndata's ``"same"`` merge."""
    if len(sources) == 1:
        return dict(sources[0].extras.uns)
    parts = [ad.AnnData(uns=s.extras.uns) for s in sources]
    return dict(ad.concat(parts, uns_merge="same").uns)


def _dropped(source: SourceInfo, plan: Plan) -> tuple[str, ...]:
    """Names of the elements of ``source`` that ``plan`` does not carry."""
    extras = source.extras
    matrices = [
        "raw" if k == "raw/X" else k
        for k in source.matrices
        if k not in plan.dtypes or (k == "raw/X" and plan.raw_var is None)
    ]
    return (
        *extras.dropped,
        *matrices,
        *(f"obsm/{k}" for k in extras.obsm if k not in plan.obsm),
        *(f"varm/{k}" for k in extras.varm if k not in plan.varm),
        *(f"uns/{k}" for k in extras.uns if k not in plan.uns),
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


def _join_var(frames: Sequence[pd.DataFrame | None], joined: pd.Index) -> pd.DataFrame:
    """Var of the collection: shared columns, values from the first input with the gene."""
    vars_ = [v for v in frames if v is not None]
    if len(vars_) == 1 and vars_[0].index.astype(str).equals(joined):
        only = vars_[0].copy()  # one input: its var as anndata read it
        only.index = joined.rename(vars_[0].index.name)
        return only
    keep = [c for c in vars_[0].columns if all(c in v.columns for v in vars_)]
    owner_pos = np.full(len(joined), -1, dtype=np.int64)
    pieces = []
    for v in vars_:
        genes = joined.get_indexer(v.index.astype(str))
        new = np.flatnonzero((genes >= 0) & (owner_pos[np.maximum(genes, 0)] < 0))
        owner_pos[genes[new]] = 0
        part = v.iloc[new][keep].copy()
        part.index = joined[genes[new]]
        pieces.append(part)
    var = pd.concat(pieces).reindex(joined) if keep else pd.DataFrame(index=joined)
    for c in keep:
        types = {type(v[c].dtype) for v in vars_}
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
    labels = pd.Index([s.label for s in sources], dtype=object)
    return [*specs, ColumnInfo(DATASET_COLUMN, "category", categories=labels)]


def _unify(name: str, infos: list[ColumnInfo | None], sources: Sequence[SourceInfo]) -> ColumnInfo:
    present = [c for c in infos if c is not None]
    kinds = {c.kind for c in present}
    missing = len(present) < len(infos)
    nullable = any(c.nullable for c in present)
    if kinds == {"numeric"}:
        dtype = np.result_type(*(c.dtype for c in present))
        nullable = dtype.kind in "biu" and (nullable or missing)  # floats: NaN for missing
        return ColumnInfo(name, "numeric", dtype, nullable=nullable)
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
        return ColumnInfo(name, "str", nullable=nullable)
    labels = [c.categories for c in present if c.categories is not None]
    union = labels[0].append(labels[1:]).drop_duplicates() if len(labels) > 1 else labels[0]
    if union.dtype == object and any(c.dtype != object for c in labels):
        union = pd.Index([str(v) for v in union], dtype=object).drop_duplicates()
    spec = ColumnInfo(name, "category", categories=union)
    ordered = not missing and all(c.ordered and c.same_categories(spec) for c in present)
    return replace(spec, ordered=ordered)


def _category_maps(source: SourceInfo, columns: list[ColumnInfo]) -> dict[str, np.ndarray]:
    out = {}
    for spec in columns:
        info = source.columns.get(spec.name)
        if spec.kind == "category" and info is not None and info.categories is not None:
            union, labels = spec.categories, info.categories
            assert union is not None  # a categorical spec has categories
            if union.dtype == object and labels.dtype != object:
                labels = pd.Index([str(v) for v in labels], dtype=object)
            out[spec.name] = union.get_indexer(labels).astype(np.int32)
    return out
