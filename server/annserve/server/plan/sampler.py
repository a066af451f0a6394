"""Samplers: which rows an epoch visits, grouped into preload buffers, in yield order.

A sampler describes the *whole* epoch as one sequence of rows (the concatenation
of its preload buffers); sharding across ranks and workers, resuming at a batch
and padding are positions in that sequence (:mod:`annserve.server.plan.epoch`), so
every sampler gets them for free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator


class ChunkLayout:
    """Contiguous chunks of ``chunk_size`` rows that never span two groups of a collection.

    Parameters
    ----------
    group_offsets
        First row of each group, then ``n_obs``; shape ``(n_groups + 1,)``, int64.
    chunk_size
        Rows per chunk (> 0); the last chunk of each group may be shorter. Any size is
        accepted: a chunk larger than its group is the whole group.
    """

    def __init__(self, group_offsets: np.ndarray, chunk_size: int) -> None:
        offsets = np.asarray(group_offsets, dtype=np.int64)
        self.chunk_size = chunk_size
        self.n_obs = int(offsets[-1])
        # the arithmetic uses a chunk of at most n_obs rows (no int64 overflow; same chunks)
        self._rows = min(chunk_size, max(self.n_obs, 1))
        self._group_starts, self._group_ends = offsets[:-1], offsets[1:]
        per_group = -(-(self._group_ends - self._group_starts) // self._rows)
        # first chunk id of each group, then the number of chunks
        self._first_chunk = np.concatenate([[0], np.cumsum(per_group)]).astype(np.int64)
        self.n_chunks = int(self._first_chunk[-1])

    def bounds(self, chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return first row and length of each chunk, two int64 arrays like ``chunk_ids``."""
        group = np.searchsorted(self._first_chunk, chunk_ids, side="right") - 1
        index_in_group = chunk_ids - self._first_chunk[group]
        starts = self._group_starts[group] + index_in_group * self._rows
        return starts, np.minimum(starts + self._rows, self._group_ends[group]) - starts

    def rows(self, chunk_ids: np.ndarray) -> np.ndarray:
        """Return the rows of the chunks, chunk after chunk, int64."""
        starts, lengths = self.bounds(chunk_ids)
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        return offsets + np.arange(int(lengths.sum()), dtype=np.int64)


class Sampler(ABC):
    """Decides the rows of an epoch and how they are grouped into preload buffers.

    A sampler is a pure function of its configuration and the epoch: it keeps
    no progress state, so any position of any epoch can be reproduced.
    """

    @property
    @abstractmethod
    def n_rows(self) -> int:
        """Rows yielded per epoch (all shards together)."""

    @abstractmethod
    def preloads(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield the epoch's preload buffers.

        Parameters
        ----------
        epoch
            Epoch number, >= 0.

        Yields
        ------
        Global row indices of one preload buffer, shape ``(n,)``, int64, in the order
        the rows are to be yielded (a row may repeat only in samplers drawing with
        replacement). Together the buffers hold ``n_rows`` rows.
        """


class ChunkSampler(Sampler):
    """Contiguous chunks, shuffled chunk order, rows shuffled within each preload buffer.

    Same semantics as annbatch ``ChunkSampler``: the store's rows are split into
    contiguous chunks of ``chunk_size`` rows (see :class:`ChunkLayout`); with
    ``shuffle`` the chunk order is a permutation drawn from a ``numpy.random.Generator``
    seeded with ``(seed, epoch)``; consecutive groups of ``preload_nchunks`` chunks form
    a preload buffer whose rows the same generator permutes. Without ``shuffle`` rows
    come in store order (the sequential sampler). Every row of ``mask`` appears
    exactly once per epoch.

    Short chunks go last, as in annbatch: its
    ``_ChunkSampler._compute_slices_without_replacement``
    (``annbatch/samplers/_chunk_sampler.py``) places the one incomplete slice last in
    iteration order regardless of shuffling, so every preload buffer but the last
    holds ``preload_nchunks * chunk_size`` rows, a multiple of ``batch_size`` (annbatch
    requires it), and no batch mixes two buffers. annbatch's slices may span the
    datasets of a collection; ours never span groups, so each group may end in a
    short chunk. With ``shuffle`` the full chunks are permuted first and the short
    ones, permuted among themselves, close the epoch: full buffers stay aligned with
    batches and only the final buffers are short. What still differs: a short chunk
    is its group's last rows (annbatch draws which slot of the range is short), and a
    masked epoch's buffers lose the rows outside the mask.

    Parameters
    ----------
    layout
        The chunks.
    preload_nchunks
        Chunks per preload buffer (> 0).
    shuffle
        Whether to permute chunks and rows.
    seed
        Seed of the generator (>= 0).
    mask
        Rows to visit (e.g. one split), shape ``(n_obs,)``, bool; None visits all rows.
        Chunks keep their place; rows outside the mask are dropped from their buffer.
    """

    def __init__(
        self,
        layout: ChunkLayout,
        preload_nchunks: int,
        *,
        shuffle: bool,
        seed: int,
        mask: np.ndarray | None = None,
    ) -> None:
        self.layout = layout
        self.preload_nchunks = preload_nchunks
        self.shuffle = shuffle
        self.seed = seed
        self._mask = mask
        self._n_rows = layout.n_obs if mask is None else int(np.count_nonzero(mask))
        _, lengths = layout.bounds(np.arange(layout.n_chunks, dtype=np.int64))
        short = lengths < layout.chunk_size
        self._full_chunks, self._short_chunks = np.flatnonzero(~short), np.flatnonzero(short)

    @property
    def n_rows(self) -> int:
        """Rows yielded per epoch: every row of the mask once."""
        return self._n_rows

    def preloads(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield preload buffers of the epoch; see :meth:`Sampler.preloads`."""
        n_chunks = self.layout.n_chunks
        rng = np.random.default_rng((self.seed, epoch))
        order = self._shuffled_chunks(rng) if self.shuffle else np.arange(n_chunks)
        for first in range(0, n_chunks, self.preload_nchunks):
            rows = self.layout.rows(np.sort(order[first : first + self.preload_nchunks]))
            if self._mask is not None:
                rows = rows[self._mask[rows]]
            yield rng.permutation(rows) if self.shuffle else rows

    def _shuffled_chunks(self, rng: np.random.Generator) -> np.ndarray:
        """Return the chunk ids, full chunks shuffled first, then short ones shuffled, int64."""
        return np.concatenate(
            [rng.permutation(self._full_chunks), rng.permutation(self._short_chunks)]
        )


class WeightedSampler(Sampler):
    """Rows drawn with replacement in proportion to per-row weights, chunk by chunk.

    Chunk-aware two-stage draw: a chunk is drawn with probability proportional to the
    sum of its rows' weights, then ``chunk_size`` rows are drawn from it in proportion
    to their weights. Every single draw therefore picks row ``i`` with probability
    exactly ``w_i / sum(w)`` (class-balanced when ``w_i = 1 / count(class of i)``),
    while reads stay whole chunks. What is traded away is independence: rows arrive
    in groups from the same chunk (mixed within each preload buffer), and rows repeat.

    Parameters
    ----------
    layout
        The chunks.
    preload_nchunks
        Chunk draws per preload buffer (> 0).
    seed
        Seed of the generator; combined with the epoch.
    weights
        Non-negative weight of every row, shape ``(n_obs,)``, float64; rows of weight 0
        are never drawn.
    num_samples
        Rows drawn per epoch (> 0).
    """

    def __init__(
        self,
        layout: ChunkLayout,
        preload_nchunks: int,
        *,
        seed: int,
        weights: np.ndarray,
        num_samples: int,
    ) -> None:
        self.layout = layout
        self.preload_nchunks = preload_nchunks
        self.seed = seed
        self._weights = weights
        starts, _ = layout.bounds(np.arange(layout.n_chunks))
        chunk_weights = np.add.reduceat(weights, starts) if len(starts) else starts
        self._chunk_p = chunk_weights / chunk_weights.sum()
        self._num_samples = num_samples

    @property
    def n_rows(self) -> int:
        """Rows drawn per epoch."""
        return self._num_samples

    def preloads(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield preload buffers of the epoch; see :meth:`Sampler.preloads`."""
        rng = np.random.default_rng((self.seed, epoch))
        size = self.layout.chunk_size
        n_draws = -(-self._num_samples // size)
        draws = rng.choice(self.layout.n_chunks, size=n_draws, p=self._chunk_p)
        for first in range(0, n_draws, self.preload_nchunks):
            chunk_ids = draws[first : first + self.preload_nchunks].tolist()
            # the epoch ends after exactly num_samples rows: the last draw takes what is left
            left = self._num_samples - first * size
            rows = [
                self._draw_rows(c, rng, min(size, left - i * size)) for i, c in enumerate(chunk_ids)
            ]
            yield rng.permutation(np.concatenate(rows))

    def _draw_rows(self, chunk_id: int, rng: np.random.Generator, size: int) -> np.ndarray:
        (start,), (length,) = self.layout.bounds(np.array([chunk_id]))
        w = self._weights[start : start + length]
        return start + rng.choice(length, size=size, p=w / w.sum())
