"""Splits and balancing by a nullable obs column: missing values are one value of their own."""

from __future__ import annotations

import numpy as np
import pandas as pd

from annserve.server.io.obs import obs_column
from annserve.server.plan.selection import Balance, Split, value_names


def _donors(n: int = 400) -> pd.Series:
    rng = np.random.default_rng(0)
    donors = pd.array(rng.integers(0, 8, n), dtype="Int64")
    donors[rng.random(n) < 0.25] = pd.NA
    return pd.Series(donors)


def test_missing_values_are_named_nan_and_not_merged_with_zero():
    column = obs_column("donor", _donors())
    assert value_names(column) == [*(str(d) for d in range(8)), "nan"]


def test_a_split_by_a_nullable_column_keeps_the_missing_rows_together():
    series = _donors()
    column = obs_column("donor", series)
    masks = [
        Split(i, (0.5, 0.5), column, seed=s).mask(len(series)) for s in range(6) for i in (0, 1)
    ]
    missing = series.isna().to_numpy()
    zero = (series == 0).fillna(False).to_numpy()
    for mask in masks:  # all missing rows on one side; donor 0 decided on its own
        assert mask[missing].all() or not mask[missing].any()
    sides = {(bool(m[missing][0]), bool(m[zero][0])) for m in masks}
    assert len(sides) > 1  # over the seeds, missing and 0 are not tied together


def test_balancing_gives_the_missing_value_its_own_share():
    series = _donors()
    column = obs_column("donor", series)
    weights = Balance(column, None, 0).row_weights(len(series))
    missing = series.isna().to_numpy()
    assert np.isclose(weights[missing].sum(), weights[(series == 3).fillna(False).to_numpy()].sum())
    assert np.isclose(weights.sum(), 9.0)  # eight donors and "missing", each a total of 1
