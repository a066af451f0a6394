"""Sampling facts both sides share: the shard record and the split defaults.

The client fills requests with them and the server validates and applies them, so
each is defined once, here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Split names, in the order of ``split_fractions``.
SPLIT_NAMES = ("train", "val", "test")
#: Default ``split_fractions``: expected shares of train, val and test rows.
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
#: Rows per block assigned to one split when splitting by position (not by an obs column).
SPLIT_BLOCK_ROWS = 1024


@dataclass(frozen=True, slots=True)
class Shard:
    """One consumer's part of every epoch.

    Attributes
    ----------
    index
        ``rank * num_workers + worker_id``, in ``0..count-1``.
    count
        ``world_size * num_workers``.
    even
        Give every shard the same number of rows: pad by repeating the epoch's first
        rows (as ``torch.utils.data.DistributedSampler``), or with ``drop_last`` drop
        the remainder. Uneven shard sizes make DDP ranks wait for each other forever.
    """

    index: int = 0
    count: int = 1
    even: bool = True
