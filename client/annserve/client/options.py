"""Sampling options of :class:`~annserve.client.RemoteLoader`: splits and balanced sampling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from annserve.sampling import DEFAULT_SPLIT_FRACTIONS
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Mapping


@dataclass(frozen=True, slots=True)
class Split:
    """A deterministic train/val/test split, computed by the server.

    The same ``seed`` gives the same split on every server restart. Splits are
    disjoint and together cover every row.

    Attributes
    ----------
    name
        ``"train"``, ``"val"`` or ``"test"`` (``"test"`` only with three fractions).
    fractions
        Expected share of rows of each split, adding up to 1.
    by
        obs column whose values go to one split whole (e.g. ``"donor"``: hold out
        whole donors; shares are then shares of values, not of rows). None assigns
        blocks of 1,024 contiguous rows.
    seed
        Seed of the assignment.
    """

    name: str
    fractions: tuple[float, ...] = DEFAULT_SPLIT_FRACTIONS
    by: str | None = None
    seed: int = 0

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Write the split into a request."""
        request.split = self.name
        request.split_fractions.extend(self.fractions)
        request.split_by = self.by or ""
        request.split_seed = self.seed


@dataclass(frozen=True, slots=True)
class Balanced:
    """Weighted (e.g. class-balanced) sampling by an obs column, drawn with replacement.

    The server draws a chunk with probability proportional to its rows' weights,
    then ``chunk_size`` rows within it in proportion to theirs: each draw picks a
    row with exactly the target probability, reads stay whole chunks, but rows of
    one chunk arrive together (mixed within each preload buffer) and rows repeat.

    Attributes
    ----------
    by
        obs column to balance (e.g. ``"cell_type"``).
    weights
        Weight per value of ``by``; None gives every value the same total weight
        (equal class proportions). Values left out get weight 0.
    num_samples
        Rows per epoch; 0 = as many as the rows of the split.
    """

    by: str
    weights: Mapping[str, float] | None = field(default=None)
    num_samples: int = 0

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Write the sampler choice into a request."""
        request.sampler = pb.SAMPLER_WEIGHTED
        request.balance_by = self.by
        request.category_weights.update(self.weights or {})
        request.num_samples = self.num_samples
