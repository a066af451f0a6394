"""obs of an input of ``annserve convert``: column types and row-range readers.

The obs index and the categorical (codes), numeric and string-array columns are read
by row range, so memory does not grow with the size of an input. Columns of other
encodings (nullable integers/booleans...) and the obs of legacy pre-0.7 ``.h5ad`` files
are read whole, once per input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import zarr

from annserve.errors import StoreFormatError
from annserve.server.io.elements import array_at, element_at

if TYPE_CHECKING:
    from pathlib import Path

    from annserve.server.io.elements import ArrayNode, GroupNode

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """Type of one obs column of one input.

    Attributes
    ----------
    name
        Column name.
    kind
        ``"category"`` (read as integer codes, -1 = missing), ``"numeric"`` (numeric or
        bool values) or ``"str"`` (object array of str).
    dtype
        numpy dtype of the values (``kind == "numeric"``); None otherwise.
    categories
        Category labels (``kind == "category"``).
    ordered
        Whether the categorical is ordered.
    """

    name: str
    kind: str
    dtype: np.dtype | None = None
    categories: tuple[object, ...] = ()
    ordered: bool = False


class ColumnReader(Protocol):
    """An obs column of one input, read by row range."""

    info: ColumnInfo

    def read(self, start: int, stop: int) -> np.ndarray:
        """Return rows ``[start, stop)`` of the column, shape ``(stop - start,)``."""
        ...


class _SlicedColumn:
    """A column read by row range: categorical codes, numeric array or string array."""

    def __init__(self, info: ColumnInfo, array: h5py.Dataset | zarr.Array) -> None:
        self.info = info
        self._array = array

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.info.kind != "str":
            return np.asarray(self._array[start:stop])
        if isinstance(self._array, h5py.Dataset):
            return self._array.asstr()[start:stop]
        return np.asarray(self._array[start:stop], dtype=object)


class _MemoryColumn:
    """A column held in memory (encodings without a sliced reader, legacy files)."""

    def __init__(self, info: ColumnInfo, values: np.ndarray) -> None:
        self.info = info
        self._values = values

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._values[start:stop]


def _memory_column(name: str, values: object) -> _MemoryColumn:
    """Classify in-memory column values (pandas or numpy) as category, numeric or str."""
    series = pd.Series(values, copy=False)
    if isinstance(series.dtype, pd.CategoricalDtype):
        info = ColumnInfo(
            name,
            "category",
            categories=_labels(series.cat.categories),
            ordered=bool(series.cat.ordered),
        )
        return _MemoryColumn(info, np.asarray(series.cat.codes, dtype=np.int64))
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        if series.isna().any():
            array = series.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            array = series.to_numpy(
                dtype=np.dtype(series.dtype.numpy_dtype)
                if hasattr(series.dtype, "numpy_dtype")
                else None
            )
        return _MemoryColumn(ColumnInfo(name, "numeric", np.dtype(array.dtype)), array)
    strings = series.astype(object).where(series.notna(), "").astype(str).to_numpy(dtype=object)
    return _MemoryColumn(ColumnInfo(name, "str"), strings)


def _labels(index: pd.Index | np.ndarray) -> tuple[object, ...]:
    """Category labels as Python scalars (str for text of any numpy string dtype)."""
    values = np.asarray(index)
    if values.dtype.kind in "biuf":
        return tuple(values.tolist())
    return tuple(str(v) for v in values.tolist())


def _column_reader(name: str, elem: GroupNode | ArrayNode) -> ColumnReader:
    encoding = elem.attrs.get("encoding-type")
    if encoding == "categorical" and isinstance(elem, h5py.Group | zarr.Group):
        categories = ad.io.read_elem(element_at(elem, "categories", name))
        info = ColumnInfo(
            name,
            "category",
            categories=_labels(categories),
            ordered=bool(elem.attrs.get("ordered", False)),
        )
        return _SlicedColumn(info, array_at(elem, "codes", name))
    if isinstance(elem, h5py.Dataset | zarr.Array) and len(elem.shape) == 1:
        if encoding == "string-array":
            return _SlicedColumn(ColumnInfo(name, "str"), elem)
        if encoding == "array" and np.dtype(elem.dtype).kind in "biuf":
            return _SlicedColumn(ColumnInfo(name, "numeric", np.dtype(elem.dtype)), elem)
    logger.debug("obs column %r (encoding %r) is read whole", name, encoding)
    return _memory_column(name, ad.io.read_elem(elem))


def check_obs_lengths(path: Path, root: h5py.Group | zarr.Group, n_obs: int) -> None:
    """Check that the obs index and every obs column have ``n_obs`` rows.

    Raises
    ------
    StoreFormatError
        Naming the columns of another length.
    """
    obs = root["obs"]
    if isinstance(obs, h5py.Dataset | zarr.Array):
        lengths = {"obs": obs.shape[0]}
    else:
        lengths = {}
        for key in obs:
            elem = element_at(obs, key, str(path))
            categorical = elem.attrs.get("encoding-type") == "categorical"
            array = (
                elem["codes"] if categorical and isinstance(elem, h5py.Group | zarr.Group) else elem
            )
            if isinstance(array, h5py.Dataset | zarr.Array):
                lengths[key] = array.shape[0]
    bad = {k: v for k, v in lengths.items() if v != n_obs}
    if bad:
        msg = f"{path}: obs has {bad} rows but X has {n_obs}"
        raise StoreFormatError(msg)


def read_annotations(
    root: h5py.Group | zarr.Group, path: Path
) -> tuple[ColumnReader, list[ColumnReader], pd.DataFrame]:
    """Return the obs-index reader, the obs column readers and var (read whole).

    Raises
    ------
    StoreFormatError
        If obs or var is missing or cannot be read.
    """
    for key in ("obs", "var"):
        if key not in root:
            msg = f"{path}: not an AnnData store (no {key!r} element)"
            raise StoreFormatError(msg)
    obs = root["obs"]
    try:
        if isinstance(obs, h5py.Dataset) or obs.attrs.get("encoding-type") != "dataframe":
            return _legacy_annotations(path)
        index = _column_reader("_index", element_at(obs, str(obs.attrs["_index"]), str(path)))
        order = obs.attrs.get("column-order", [])
        names = [str(k) for k in order] if isinstance(order, list | tuple | np.ndarray) else []
        columns = [_column_reader(k, element_at(obs, k, str(path))) for k in names]
        var = ad.io.read_elem(root["var"])
    except StoreFormatError:
        raise
    except Exception as e:  # anndata/h5py/zarr raise many types for a malformed element
        msg = f"{path}: cannot read obs/var: {e!r}"
        raise StoreFormatError(msg) from e
    if index.info.kind != "str":
        index = _memory_column("_index", index.read(0, 2**62).astype(str))
    return index, columns, var


def _legacy_annotations(path: Path) -> tuple[ColumnReader, list[ColumnReader], pd.DataFrame]:
    """Read obs and var of a pre-0.7 ``.h5ad`` whole, with anndata's backed reader."""
    logger.info("%s: legacy obs layout, reading obs whole", path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        obs, var = backed.obs, backed.var
    finally:
        backed.file.close()
    index = _memory_column("_index", obs.index.astype(str).to_numpy(dtype=object))
    return index, [_memory_column(str(k), obs[k]) for k in obs.columns], var
