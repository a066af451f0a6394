"""obs of an input of ``annserve convert``: column types and values, read with anndata.

obs and var are read whole, once per input, by anndata's own readers
(:func:`anndata.io.read_elem` on the obs/var dataframes; :func:`anndata.read_h5ad` with
``backed="r"`` for the compound-dataset layout of anndata < 0.7), so every encoding
anndata reads is read as anndata reads it: old-format categoricals (int codes with a
``categories`` attribute), nullable integers, booleans and strings, integer categories.
Each column is then held as flat numpy arrays (codes, values, a missing-value mask)
that the passes slice by row range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import anndata as ad
import numpy as np
import pandas as pd

from annserve.errors import StoreFormatError

if TYPE_CHECKING:
    from pathlib import Path

    import h5py
    import zarr

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """Type of one obs column of one input, or of the collection.

    Attributes
    ----------
    name
        Column name.
    kind
        ``"category"`` (integer codes, -1 = missing), ``"numeric"`` (numeric or bool
        values) or ``"str"`` (object array of str).
    dtype
        numpy dtype of the values (``kind == "numeric"``); None otherwise.
    categories
        Category labels (``kind == "category"``), with their dtype (e.g. int32).
    ordered
        Whether the categorical is ordered.
    nullable
        Whether the column is a pandas nullable one (``Int*``/``UInt*``, ``boolean``,
        ``string``): values plus a mask, missing values ``pd.NA``.
    """

    name: str
    kind: str
    dtype: np.dtype | None = None
    categories: pd.Index | None = None
    ordered: bool = False
    nullable: bool = False

    def same_categories(self, other: ColumnInfo) -> bool:
        """Whether both columns have equal category labels, in the same order."""
        a, b = self.categories, other.categories
        return a is not None and b is not None and a.equals(b)


@dataclass(frozen=True, slots=True)
class ObsColumn:
    """One obs column of one input, in memory.

    Attributes
    ----------
    info
        Its type.
    values
        Shape ``(n_obs,)``: int64 codes, numeric values (missing ones arbitrary when
        ``info.nullable``) or an object array of str.
    mask
        Shape ``(n_obs,)`` bool, True where missing (nullable columns); None otherwise.
    """

    info: ColumnInfo
    values: np.ndarray
    mask: np.ndarray | None = None


def obs_column(name: str, series: pd.Series) -> ObsColumn:
    """Hold a column read by anndata as flat arrays (codes, values, mask)."""
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        info = ColumnInfo(
            name, "category", categories=dtype.categories, ordered=bool(dtype.ordered)
        )
        return ObsColumn(info, series.cat.codes.to_numpy(dtype=np.int64))
    nullable = isinstance(dtype, pd.api.extensions.ExtensionDtype)
    mask = series.isna().to_numpy(dtype=bool) if nullable else None
    if pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
        numpy_dtype = np.dtype(cast("np.dtype", getattr(dtype, "numpy_dtype", dtype)))
        if nullable:  # missing values filled; NaN of a numpy float column is a value, kept
            values = series.to_numpy(dtype=numpy_dtype, na_value=numpy_dtype.type(0))
        else:
            values = series.to_numpy(dtype=numpy_dtype)
        if numpy_dtype.kind == "f" and mask is not None:  # anndata writes no nullable floats
            values[mask], nullable, mask = np.nan, False, None
        return ObsColumn(ColumnInfo(name, "numeric", numpy_dtype, nullable=nullable), values, mask)
    strings = series.astype(object).where(series.notna(), "").astype(str).to_numpy(dtype=object)
    string_dtype = isinstance(dtype, pd.StringDtype)
    return ObsColumn(ColumnInfo(name, "str", nullable=string_dtype), strings, mask)


def read_obs_var(
    root: h5py.Group | zarr.Group, path: Path, n_obs: int, legacy: ad.AnnData | None
) -> tuple[np.ndarray, list[ObsColumn], pd.DataFrame]:
    """Return the obs names (object array of str), the obs columns and var.

    Parameters
    ----------
    root
        The input's root group.
    path
        The input, for messages.
    n_obs
        Rows of X.
    legacy
        The input opened with :func:`anndata.read_h5ad` (``backed="r"``) when it has the
        compound-dataset layout; None otherwise.

    Raises
    ------
    StoreFormatError
        If obs or var is missing, cannot be read, or obs does not have ``n_obs`` rows.
    """
    for key in ("obs", "var"):
        if key not in root:
            msg = f"{path}: not an AnnData store (no {key!r} element)"
            raise StoreFormatError(msg)
    try:
        if legacy is not None:
            obs, var = legacy.obs, legacy.var
        else:
            obs, var = ad.io.read_elem(root["obs"]), ad.io.read_elem(root["var"])
    except Exception as e:  # anndata/h5py/zarr raise many types for a malformed element
        msg = f"{path}: cannot read obs/var: {e!r}"
        raise StoreFormatError(msg) from e
    if len(obs) != n_obs:
        msg = f"{path}: obs has {len(obs)} rows but X has {n_obs}"
        raise StoreFormatError(msg)
    names = obs.index.astype(str).to_numpy(dtype=object)
    return names, [obs_column(str(k), obs[k]) for k in obs.columns], var
