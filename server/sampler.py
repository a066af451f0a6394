"""Samplers: which rows an epoch visits, grouped into preload buffers, in yield order."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterator


class Sampler(ABC):
    """Decides the rows of an epoch and how they are grouped into preload buffers.

    A sampler is a pure function of its configuration and the epoch: it keeps
    no progress state, so any position of any epoch can be reproduced.
    """

    @property
    @abstractmethod
    def n_rows(self) -> int:
        """Rows yielded per epoch."""

    @abstractmethod
    def preloads(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield the epoch's preload buffers.

        Parameters
        ----------
        epoch
            Epoch number, >= 0.

        Yields
        ------
        Global row indices of one preload buffer, shape ``(n,)``, int64, unique, in
        the order the rows are to be yielded. Together the buffers hold ``n_rows`` rows.
        """


class ChunkSampler(Sampler):
    """Contiguous chunks, shuffled chunk order, rows shuffled within each preload buffer.

    Same semantics as annbatch ``ChunkSampler``: the rows ``0..n_obs-1`` are split into
    contiguous chunks of ``chunk_size`` rows (the last one of each group may be
    shorter: chunks never span two groups of a collection); with
    ``shuffle`` the chunk order is a permutation drawn from a
    ``numpy.random.Generator`` seeded with ``(seed, epoch)``; consecutive groups of
    ``preload_nchunks`` chunks form a preload buffer whose rows are permuted by the
    same generator. Without ``shuffle`` rows come in store order.

    Parameters
    ----------
    n_obs
        Rows in the store.
    chunk_size
        Rows per chunk (> 0).
    preload_nchunks
        Chunks per preload buffer (> 0).
    shuffle
        Whether to permute chunks and rows.
    seed
        Seed of the generator (>= 0).
    group_offsets
        First row of each group of a collection, then ``n_obs``; shape ``(n_groups + 1,)``.
        None: one group.
    """

    def __init__(self, n_obs: int, chunk_size: int, preload_nchunks: int, *, shuffle: bool,
                 seed: int, group_offsets: np.ndarray | None = None) -> None:
        self._n_obs = n_obs
        self.chunk_size = chunk_size
        self.preload_nchunks = preload_nchunks
        self.shuffle = shuffle
        self.seed = seed
        offsets = np.asarray(group_offsets if group_offsets is not None else [0, n_obs], np.int64)
        self._group_starts = offsets[:-1]
        self._group_ends = offsets[1:]
        # first chunk id of each group, then the total number of chunks
        per_group = -(-(self._group_ends - self._group_starts) // chunk_size)
        self._first_chunk = np.concatenate([[0], np.cumsum(per_group)])

    @property
    def n_rows(self) -> int:
        """Rows yielded per epoch: every row of the store once."""
        return self._n_obs

    def preloads(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield preload buffers of the epoch; see :meth:`Sampler.preloads`."""
        n_chunks = int(self._first_chunk[-1])
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(n_chunks) if self.shuffle else np.arange(n_chunks)
        for first in range(0, n_chunks, self.preload_nchunks):
            chunk_ids = np.sort(order[first:first + self.preload_nchunks])
            rows = self._chunk_rows(chunk_ids)
            yield rng.permutation(rows) if self.shuffle else rows

    def _chunk_rows(self, chunk_ids: np.ndarray) -> np.ndarray:
        group = np.searchsorted(self._first_chunk, chunk_ids, side="right") - 1
        index_in_group = chunk_ids - self._first_chunk[group]
        starts = self._group_starts[group] + index_in_group * self.chunk_size
        lengths = np.minimum(starts + self.chunk_size, self._group_ends[group]) - starts
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        return offsets + np.arange(int(lengths.sum()), dtype=np.int64)
