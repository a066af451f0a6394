"""What an epoch serves: which rows (splits), with what weight (balanced sampling), which genes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from annserve.errors import InvalidRequestError, listed
from annserve.sampling import SPLIT_BLOCK_ROWS
from annserve.server.plan.sampler import ChunkLayout, ChunkSampler, Sampler, WeightedSampler

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from annserve.server.io.obs import ObsColumnData
    from annserve.server.io.store import Store


@dataclass(frozen=True, slots=True)
class Split:
    """A deterministic train/val/test split.

    Attributes
    ----------
    index
        Position of the requested split in ``fractions`` (0 = train, 1 = val, 2 = test).
    fractions
        Expected share of each split, adding up to 1.
    by
        obs column whose values are assigned to splits whole (e.g. donors held out
        together); None assigns blocks of ``SPLIT_BLOCK_ROWS`` contiguous rows.
    seed
        Seed of the assignment; the same seed gives the same split on every server.
    """

    index: int
    fractions: tuple[float, ...]
    by: ObsColumnData | None
    seed: int

    def mask(self, n_obs: int) -> np.ndarray:
        """Return which rows belong to the split, shape ``(n_obs,)``, bool."""
        if self.by is None:
            units = -(-n_obs // SPLIT_BLOCK_ROWS)
            unit_of_row = np.arange(n_obs) // SPLIT_BLOCK_ROWS
        else:
            unit_of_row, units = _value_codes(self.by)
        draws = np.random.default_rng(self.seed).random(units)
        assigned = np.searchsorted(np.cumsum(self.fractions), draws, side="right")
        return assigned[unit_of_row] == self.index


@dataclass(frozen=True, slots=True)
class Balance:
    """Weights of balanced sampling.

    Attributes
    ----------
    by
        obs column whose values are weighted.
    weights
        Weight of each value (as a string); None gives every value the same total
        weight (class-balanced: ``w = 1 / count(value)``).
    num_samples
        Rows per epoch; 0 = as many as the rows in the split.
    """

    by: ObsColumnData
    weights: Mapping[str, float] | None
    num_samples: int

    def row_weights(self, n_obs: int) -> np.ndarray:
        """Return each row's weight, shape ``(n_obs,)``, float64."""
        codes, n_values = _value_codes(self.by)
        if self.weights is None:
            counts = np.bincount(codes, minlength=n_values).astype(np.float64)
            per_value = np.divide(1.0, counts, out=np.zeros(n_values), where=counts > 0)
        else:
            per_value = np.array([self.weights.get(v, 0.0) for v in value_names(self.by)])
        return per_value[codes]


def value_names(column: ObsColumnData) -> list[str]:
    """Return the distinct values of an obs column as strings, in code order.

    Missing values (code -1 of a categorical, the mask of a nullable column) are one
    more value, ``"nan"``, last.
    """
    if column.kind == "category":
        return [*column.categories, "nan"]
    present = column.values if column.missing is None else column.values[~column.missing]
    names = [str(v) for v in np.unique(present)]
    return names if column.missing is None else [*names, "nan"]


def _value_codes(column: ObsColumnData) -> tuple[np.ndarray, int]:
    """Integer code of every row's value (missing values last), and how many values."""
    if column.kind == "category":
        n = len(column.categories)
        return np.where(column.values < 0, n, column.values).astype(np.int64), n + 1
    if column.missing is None:
        values, codes = np.unique(column.values, return_inverse=True)
        return codes.astype(np.int64), len(values)
    present = ~column.missing
    values, inverse = np.unique(column.values[present], return_inverse=True)
    codes = np.full(len(column.values), len(values), dtype=np.int64)
    codes[present] = inverse
    return codes, len(values) + 1


def gene_columns(
    var_names: Sequence[str], names: Sequence[str], *, zeros: bool
) -> np.ndarray | None:
    """Positions of the requested genes among the served matrix's genes.

    Parameters
    ----------
    var_names
        Requested genes, in output order, each once (a model's gene vocabulary); empty
        for all genes.
    names
        Gene names of the served matrix (the store's var_names, or raw_var_names).
    zeros
        Serve genes absent from ``names`` as all-zero columns (position -1) instead of
        refusing the request (``MISSING_GENES_ZEROS``).

    Returns
    -------
    Shape ``(len(var_names),)``, int64, -1 for an absent gene; None for all genes.

    Raises
    ------
    InvalidRequestError
        If a gene is listed twice, or is absent and ``zeros`` is False (naming the
        first few and the remedy).
    """
    if not var_names:
        return None
    index = {name: i for i, name in enumerate(names)}
    columns = np.array([index.get(v, -1) for v in var_names], dtype=np.int64)
    if not zeros and (columns < 0).any():
        unknown = [v for v, c in zip(var_names, columns.tolist(), strict=True) if c < 0]
        msg = (
            f"var_names: {len(unknown)} unknown gene(s), e.g. {listed(unknown[:5])}; "
            f"the served matrix has {len(names)} genes, e.g. {listed(names[:5])}; "
            "missing_genes=MISSING_GENES_ZEROS serves absent genes as zeros"
        )
        raise InvalidRequestError(msg)
    if len(set(var_names)) < len(var_names):
        repeated = sorted(v for v, n in Counter(var_names).items() if n > 1)
        msg = f"var_names: each name may be listed once, repeated {listed(repeated)}"
        raise InvalidRequestError(msg)
    return columns


class SamplerSpec(Protocol):
    """What :func:`make_sampler` needs of a stream; a validated ``StreamPlan`` is one.

    Declared here, not imported from :mod:`~annserve.server.plan.request`, so that the
    request module depends on this one and not the other way round.
    """

    @property
    def chunk_size(self) -> int:
        """Contiguous rows per chunk."""
        ...

    @property
    def preload_nchunks(self) -> int:
        """Chunks per preload buffer."""
        ...

    @property
    def shuffle(self) -> bool:
        """Permute chunks and rows within preload buffers."""
        ...

    @property
    def seed(self) -> int:
        """Generator seed."""
        ...

    @property
    def split(self) -> Split | None:
        """The split the epoch draws from; None for all rows."""
        ...

    @property
    def balance(self) -> Balance | None:
        """Weighted sampling; None for the chunk sampler."""
        ...


def make_sampler(store: Store, plan: SamplerSpec) -> Sampler:
    """Build the sampler of a stream.

    Parameters
    ----------
    store
        The served store; chunks never span its groups.
    plan
        The validated request (a ``StreamPlan``): ``chunk_size``, ``preload_nchunks``,
        ``shuffle`` and ``seed`` as in :class:`~annserve.server.plan.sampler.ChunkSampler`;
        ``split`` restricts the rows; ``balance`` selects the :class:`WeightedSampler`.
    """
    layout = ChunkLayout(store.group_offsets, plan.chunk_size)
    mask = plan.split.mask(store.n_obs) if plan.split is not None else None
    if plan.balance is None:
        return ChunkSampler(
            layout, plan.preload_nchunks, shuffle=plan.shuffle, seed=plan.seed, mask=mask
        )
    weights = plan.balance.row_weights(store.n_obs)
    if mask is not None:
        weights = weights * mask
    if not weights.any():
        msg = "balance_by: no row of the requested split has a positive weight"
        raise InvalidRequestError(msg)
    num_samples = plan.balance.num_samples or int(np.count_nonzero(weights))
    return WeightedSampler(
        layout, plan.preload_nchunks, seed=plan.seed, weights=weights, num_samples=num_samples
    )
