"""obs columns prepared for slicing by row, and the concatenation of several groups' obs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass(frozen=True, slots=True)
class ObsColumnData:
    """One obs column prepared for slicing by row.

    Attributes
    ----------
    name
        Column name.
    kind
        ``"category"`` (``values`` are the integer codes, -1 = missing), ``"numeric"``
        (numeric or bool numpy values) or ``"str"`` (``values`` is an object array of str).
    values
        Shape ``(n_obs,)``; 0 or ``""`` where ``missing`` is set.
    dtype
        pandas dtype name reported to clients (``"category"``, ``"int8"``, ``"Int64"``,
        ``"boolean"``, ``"string"``, ``"str"``...).
    categories
        Category labels as text, ``str()`` of each (``kind == "category"`` only).
    ordered
        Whether the categorical is ordered.
    categories_dtype
        dtype of the categories: ``"str"`` for text, else a numpy dtype name.
    missing
        True where the value is missing, shape ``(n_obs,)``, bool; None for columns
        that cannot hold missing values (numpy numbers, where NaN is a value, and
        categoricals, where code -1 says it).
    """

    name: str
    kind: str
    values: np.ndarray
    dtype: str
    categories: tuple[str, ...] = ()
    ordered: bool = False
    categories_dtype: str = ""
    missing: np.ndarray | None = None


def obs_column(name: str, series: pd.Series) -> ObsColumnData:
    """Prepare one obs column as anndata read it, keeping its dtype and missing values.

    Categoricals keep their categories' dtype (``Categorical([0, 10])`` has int64
    categories); pandas nullable integers and booleans travel as numpy values plus a
    missing mask; everything else that is not a numpy number becomes text (with a
    mask when values are missing).
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        cats = dtype.categories
        numeric = cats.dtype.kind in "biuf"
        return ObsColumnData(
            name,
            "category",
            np.asarray(series.cat.codes),
            "category",
            tuple(str(c) for c in cats),
            bool(dtype.ordered),
            cats.dtype.name if numeric else "str",
        )
    if isinstance(dtype, np.dtype) and dtype.kind in "biuf":
        return ObsColumnData(name, "numeric", series.to_numpy(), dtype.name)
    missing = series.isna().to_numpy()
    if _masked_number(dtype):
        values = series.to_numpy(dtype=dtype.numpy_dtype, na_value=0)  # type: ignore[union-attr]  # masked dtypes have it
        return ObsColumnData(name, "numeric", values, dtype.name, missing=missing)
    text = series.astype(object).where(~missing, "").astype(str).to_numpy(dtype=object)
    label = "string" if isinstance(dtype, pd.StringDtype) else "str"
    nullable = label == "string" or bool(missing.any())
    return ObsColumnData(name, "str", text, label, missing=missing if nullable else None)


def _masked_number(dtype: object) -> bool:
    """Whether ``dtype`` is a pandas nullable number or boolean (``Int64``, ``boolean``...)."""
    return (
        isinstance(dtype, pd.api.extensions.ExtensionDtype)
        and hasattr(dtype, "numpy_dtype")
        and (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))
    )


def concat_obs(parts: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate the obs of several groups, in order, with pandas.

    Columns present in every group are kept. Categoricals get the union of their
    categories in order of first appearance (:func:`pandas.api.types.union_categoricals`;
    ordered only when every part is ordered with the same categories); other columns
    take pandas' common dtype (:func:`pandas.concat`), text when there is none.

    Parameters
    ----------
    parts
        Each group's obs, indexed by its obs_names.

    Returns
    -------
    One frame of ``sum(len(p))`` rows, indexed by the groups' obs_names in order.
    """
    if len(parts) == 1:
        return parts[0]
    names = [n for n in parts[0].columns if all(n in p.columns for p in parts[1:])]
    index = pd.Index(np.concatenate([p.index.to_numpy(dtype=object) for p in parts]))
    columns = {n: _concat_column([p[n] for p in parts]) for n in names}
    return pd.DataFrame(columns, index=index)


def _concat_column(parts: list[pd.Series]) -> pd.api.extensions.ExtensionArray | np.ndarray:
    """Concatenate one column's parts; the values only (the frame's index is set once)."""
    dtypes = [p.dtype for p in parts]
    if all(isinstance(d, pd.CategoricalDtype) for d in dtypes):
        first = dtypes[0]
        ordered = all(d == first and d.ordered for d in dtypes)  # type: ignore[union-attr]  # categorical
        try:
            return union_categoricals(parts, ignore_order=not ordered)
        except TypeError:  # categories of different dtypes: served as text
            parts = [p.astype(str) for p in parts]
    return pd.concat(parts, ignore_index=True).array
