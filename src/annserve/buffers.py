"""Reuse large buffers once nothing refers to them any more (server and client).

Fresh large allocations are mmapped and page-faulted on first write; on these
machines zeroing those pages cost a third of the daemon's CPU (preload buffers)
and about as much as the decoding itself on the client. A buffer handed out is
reused only after every array and tensor viewing it is gone, so a caller that
keeps arrays alive (a training loop holding batches) is never affected: it just
gets fresh buffers.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from annserve.memory import small_pages

#: Buffers smaller than this come from malloc's own pools anyway, bytes.
MIN_POOLED_BYTES = 1 << 20
#: Headroom allocated beyond the request, so slightly larger batches fit later.
_GROWTH = 1.25
# references to a free buffer: the pool's list, the loop variable, getrefcount's argument
_FREE_REFS = 3


class BufferPool:
    """Hands out numpy arrays carved from reusable byte buffers.

    Parameters
    ----------
    max_buffers
        Buffers kept for reuse; beyond that, allocations are not pooled.
    """

    def __init__(self, max_buffers: int = 32) -> None:
        self._buffers: list[np.ndarray] = []
        self._max = max_buffers
        self._lock = threading.Lock()  # two threads must not both take one free buffer

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """Return an uninitialised array of ``shape`` and ``dtype``, reusing a free buffer."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_POOLED_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            return self._buffer(nbytes)[:nbytes].view(dtype).reshape(shape)

    def _buffer(self, nbytes: int) -> np.ndarray:
        best = None
        for buf in self._buffers:
            if (
                buf.nbytes >= nbytes
                and sys.getrefcount(buf) == _FREE_REFS
                and (best is None or buf.nbytes < best.nbytes)
            ):
                best = buf
        if best is not None:
            return best
        buf = np.empty(int(nbytes * _GROWTH), np.uint8)
        small_pages(buf)  # first written in a hurry (a first batch), then reused
        if len(self._buffers) < self._max:
            self._buffers.append(buf)
        return buf
