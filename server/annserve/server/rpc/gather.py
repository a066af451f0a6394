"""Write a serialized frame's parts with ``pwritev`` or ``writev``, iovecs built by numpy.

A shared-memory frame is the header followed by one slice of the preload buffer per
row and array: ~8k pieces per batch of 4,096 rows. ``os.pwritev`` takes Python
buffers, so each piece would first become a numpy view (~0.2 us each, about as much
CPU as copying its bytes); here the ``(address, length)`` pairs of the whole frame
are computed in a few vectorized numpy operations and handed to libc's ``pwritev``
through ctypes, ``IOV_MAX`` at a time: into a memfd slot (:func:`pwrite_parts`) or
onto a bulk connection's socket (:func:`send_parts`). The daemon's own memory is
only read.
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
def _libc_writer(name: str) -> Callable[..., int]:
    """Return libc's ``pwritev(fd, iov, iovcnt, offset)`` or ``writev(fd, iov, iovcnt)``, typed."""
    write = libc.function(name)
    if write is None:
        msg = f"the C library has no {name}"
        raise OSError(msg)
    args = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    write.argtypes = [*args, ctypes.c_long] if name == "pwritev" else args
    write.restype = ctypes.c_ssize_t
    return write


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
    pwritev = _libc_writer("pwritev")

    def write(block: np.ndarray, written: int) -> int:
        return _written(pwritev(fd, block.ctypes.data, len(block), offset + written))

    return _write_all(write, parts, fd)


def send_parts(fd: int, parts: Sequence[Part], wait_writable: Callable[[], None]) -> int:
    """Send the concatenation of ``parts`` on a non-blocking socket; return the bytes sent.

    Parameters
    ----------
    fd
        A connected stream socket's descriptor, in non-blocking mode.
    parts
        As for :func:`pwrite_parts`.
    wait_writable
        Called whenever the socket's buffer is full; returns once it may take more,
        or raises (e.g. when the peer reads nothing for too long).

    Raises
    ------
    DataLossError, OSError
        As :func:`pwrite_parts` does (``EPIPE`` or ``ECONNRESET`` when the peer left);
        and whatever ``wait_writable`` raises.
    """
    writev = _libc_writer("writev")

    def write(block: np.ndarray, _: int) -> int:
        while True:
            n = writev(fd, block.ctypes.data, len(block))
            err = ctypes.get_errno() if n < 0 else 0
            if err == errno.EAGAIN:
                wait_writable()
            elif err != errno.EINTR:
                return _written(n)

    return _write_all(write, parts, fd)


def _written(n: int) -> int:
    """Return a ``writev``/``pwritev`` result, raising for a failure (-1 and ``errno``)."""
    if n >= 0:
        return n
    err = ctypes.get_errno()
    if err == errno.EFAULT:
        msg = "a store file shrank while its rows were being sent (truncated?)"
        raise DataLossError(msg)
    raise OSError(err, os.strerror(err))


def _write_all(write: Callable[[np.ndarray, int], int], parts: Sequence[Part], fd: int) -> int:
    """Write the iovecs of ``parts`` with ``write(block, written)``, ``IOV_MAX`` at a time.

    ``write`` takes at most ``IOV_MAX`` iovecs and the bytes written before them, and
    returns how many it wrote; a short write is resumed where it stopped.
    """
    iov, owners = iovecs(parts)
    written, i = 0, 0
    while i < len(iov):
        block = iov[i : i + IOV_MAX]
        n = write(block, written)
        if n == 0 and block[:, 1].any():
            msg = f"nothing written at byte {written} of a frame to fd {fd}"
            raise OSError(msg)
        written += n
        i += len(block) if n == int(block[:, 1].sum()) else _advance(block, n)
    del owners  # the memory iov points into is needed until here
    return written


def _advance(block: np.ndarray, n: int) -> int:
    """Consume ``n`` written bytes from the front of ``block``; return the entries done.

    An entry written in part is shrunk in place to its rest (``block`` is a view of
    the frame's iovec array), so the next write starts with it.
    """
    ends = np.cumsum(block[:, 1])
    done = int(np.searchsorted(ends, n, side="right"))
    if done < len(block):
        rest = n - (int(ends[done - 1]) if done else 0)
        block[done, 0] += np.uint64(rest)
        block[done, 1] -= np.uint64(rest)
    return done
