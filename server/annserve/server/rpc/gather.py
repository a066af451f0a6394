"""Write a serialized frame's parts into a file with ``pwritev``, iovecs built by numpy.

A shared-memory frame is the header followed by one slice of the preload buffer per
row and array: ~8k pieces per batch of 4,096 rows. ``os.pwritev`` takes Python
buffers, so each piece would first become a numpy view (~0.2 us each, about as much
CPU as copying its bytes); here the ``(address, length)`` pairs of the whole frame
are computed in a few vectorized numpy operations and handed to libc's ``pwritev``
through ctypes, ``IOV_MAX`` at a time. The daemon's own memory is only read.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import TYPE_CHECKING

import numpy as np

from annserve import libc
from annserve.errors import DataLossError
from annserve.wire import IOV_MAX, Iovecs, Pieces

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from annserve.wire import Part


@functools.cache
def _libc_pwritev() -> Callable[[int, int, int, int], int]:
    """Return libc's ``pwritev(fd, iov, iovcnt, offset)``, typed, loaded on first use."""
    pwritev = libc.function("pwritev")
    if pwritev is None:
        msg = "the C library has no pwritev"
        raise OSError(msg)
    pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    pwritev.restype = ctypes.c_ssize_t
    return pwritev


def iovecs(parts: Sequence[Part]) -> tuple[np.ndarray, list[object]]:
    """Return the ``struct iovec`` array of ``parts``, in order, and what owns its memory.

    Parameters
    ----------
    parts
        A frame's parts, as :func:`annserve.wire.frame_parts` returns them.

    Returns
    -------
    iov
        Shape ``(n, 2)``, uint64, C-contiguous: each buffer's address and length
        (bytes), the layout of Linux's ``struct iovec``.
    owners
        What owns the memory ``iov`` points into; it must stay alive while ``iov`` is used.
    """
    owners: list[object] = []
    blocks: list[np.ndarray] = []
    for part in parts:
        if isinstance(part, Iovecs):
            owners.append(part.owners)
            blocks.append(part.iov)
            continue
        if isinstance(part, Pieces):
            values, size = part.values, part.values.dtype.itemsize
            block = np.empty((len(part.starts), 2), np.uint64)
            block[:, 0] = values.ctypes.data + part.starts.astype(np.uint64) * size
            block[:, 1] = (part.stops - part.starts).astype(np.uint64) * size
        else:
            values = np.frombuffer(part, np.uint8)
            block = np.array([[values.ctypes.data, values.nbytes]], np.uint64)
        owners.append(values)
        blocks.append(block)
    return np.concatenate(blocks) if blocks else np.empty((0, 2), np.uint64), owners


def pwrite_parts(fd: int, parts: Sequence[Part], offset: int) -> int:
    """Write the concatenation of ``parts`` to ``fd`` at ``offset``; return the bytes written.

    Parameters
    ----------
    fd
        A file descriptor open for writing (e.g. a memfd slot).
    parts
        A frame's parts, as :func:`annserve.wire.frame_parts` returns them.
    offset
        Byte position in the file of the first byte.

    Raises
    ------
    DataLossError
        If a source range cannot be read (``EFAULT``): a store file mapped for
        :class:`~annserve.wire.Iovecs` was truncated while its rows were gathered.
    OSError
        If ``pwritev`` fails otherwise, or writes nothing while bytes remain.
    """
    pwritev = _libc_pwritev()
    iov, owners = iovecs(parts)
    written, i = 0, 0
    while i < len(iov):
        block = iov[i : i + IOV_MAX]
        n = pwritev(fd, block.ctypes.data, len(block), offset + written)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EFAULT:
                msg = "a store file shrank while its rows were being sent (truncated?)"
                raise DataLossError(msg)
            raise OSError(err, os.strerror(err))
        if n == 0 and block[:, 1].any():
            msg = f"pwritev wrote nothing at byte {offset + written} of fd {fd}"
            raise OSError(msg)
        written += n
        i += len(block) if n == int(block[:, 1].sum()) else _advance(block, n)
    del owners  # the memory iov points into is needed until here
    return written


def _advance(block: np.ndarray, n: int) -> int:
    """Consume ``n`` written bytes from the front of ``block``; return the entries done.

    An entry written in part is shrunk in place to its rest (``block`` is a view of
    the frame's iovec array), so the next ``pwritev`` starts with it.
    """
    ends = np.cumsum(block[:, 1])
    done = int(np.searchsorted(ends, n, side="right"))
    if done < len(block):
        rest = n - (int(ends[done - 1]) if done else 0)
        block[done, 0] += np.uint64(rest)
        block[done, 1] -= np.uint64(rest)
    return done
