"""obs columns prepared for slicing by row, and their concatenation across groups."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

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
        Shape ``(n_obs,)``.
    dtype
        dtype name reported to clients.
    categories
        Category labels as strings (``kind == "category"`` only).
    ordered
        Whether the categorical is ordered.
    """

    name: str
    kind: str
    values: np.ndarray
    dtype: str
    categories: tuple[str, ...] = ()
    ordered: bool = False


def obs_column(name: str, series: pd.Series) -> ObsColumnData:
    """Prepare one obs column read by anndata."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        cats = tuple(str(c) for c in series.cat.categories)
        return ObsColumnData(
            name,
            "category",
            np.asarray(series.cat.codes),
            "category",
            cats,
            bool(series.cat.ordered),
        )
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "biuf":
        return ObsColumnData(name, "numeric", series.to_numpy(), series.dtype.name)
    return ObsColumnData(name, "str", series.astype(str).to_numpy(dtype=object), "str")


def concat_obs(parts: Sequence[dict[str, ObsColumnData]]) -> dict[str, ObsColumnData]:
    """Concatenate the obs of several groups, in order.

    Columns present in every group are kept. Categoricals get the union of their
    categories (in order of first appearance) and codes are translated to it;
    numeric columns take numpy's common dtype; anything else becomes strings.
    """
    if len(parts) == 1:
        return dict(parts[0])
    names = [n for n in parts[0] if all(n in p for p in parts[1:])]
    return {n: _concat_column([p[n] for p in parts]) for n in names}


def _concat_column(columns: list[ObsColumnData]) -> ObsColumnData:
    kinds = {c.kind for c in columns}
    first = columns[0]
    if kinds == {"category"}:
        categories = tuple(dict.fromkeys(cat for c in columns for cat in c.categories))
        position = {cat: i for i, cat in enumerate(categories)}
        codes = [
            np.append(np.array([position[cat] for cat in c.categories], dtype=np.int32), -1)[
                c.values
            ]
            for c in columns
        ]  # code -1 indexes the appended -1
        ordered = all(c.ordered for c in columns) and len({c.categories for c in columns}) == 1
        return replace(first, values=np.concatenate(codes), categories=categories, ordered=ordered)
    if kinds == {"numeric"}:
        values = np.concatenate([c.values for c in columns])
        return replace(first, values=values, dtype=values.dtype.name)
    values = np.concatenate(
        [
            c.values.astype(str).astype(object)
            if c.kind != "category"
            else np.array(c.categories + ("nan",), dtype=object)[c.values]
            for c in columns
        ]
    )
    return ObsColumnData(first.name, "str", values, "str")
