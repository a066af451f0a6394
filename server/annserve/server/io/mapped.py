"""Uncompressed 1-d arrays mapped read-only from their chunk files, for gathers by the kernel.

A same-host stream's frames are written into shared memory by ``pwritev``
(:mod:`annserve.server.rpc.gather`). Handed the rows' addresses in a read-only
mapping of the store's files instead of a preload buffer, that one copy takes them
straight from the page cache, and the read into a preload buffer goes: ``preadv`` was
~27% of a same-host daemon's CPU (perf, ``atlas_narrow.zarr``, batch 4,096, chunk 32 x
preload 256).

Only the kernel ever touches a mapping: a file truncated under it makes that write
fail (``EFAULT``, raised as :class:`~annserve.errors.DataLossError` by the writer)
where a read from Python would kill the daemon (``SIGBUS``). Each file's size is also
checked against the chunks a buffer uses before their addresses are handed out, so a
file truncated before then is refused by name, as
:class:`~annserve.server.io.chunkfiles.ChunkFileRanges` refuses it.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from annserve.errors import DataLossError

if TYPE_CHECKING:
    from annserve.server.io.chunkfiles import ChunkFiles

logger = logging.getLogger(__name__)

#: Files one array keeps mapped (and open) at most; the least recently used go first.
MAX_MAPPED_FILES = 64


@dataclass(frozen=True, slots=True)
class RowIovecs:
    """Where each row of a buffer lies in mapped memory: one or more ranges per row.

    Attributes
    ----------
    iov
        Shape ``(m, 2)``, uint64: each range's address and length in bytes (Linux's
        ``struct iovec``); a row cut by a chunk boundary has one range per chunk.
    offsets
        Shape ``(n_rows + 1,)``, int64: row ``i``'s ranges are ``iov[offsets[i]:offsets[i + 1]]``.
    owners
        The mappings ``iov`` points into; they stay mapped while this object lives.
    """

    iov: np.ndarray
    offsets: np.ndarray
    owners: tuple[object, ...]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Return the ranges of rows ``positions`` (shape ``(k,)``, int), in that order.

        Returns
        -------
        Shape ``(r, 2)``, uint64, C-contiguous.
        """
        first = self.offsets[positions]
        counts = self.offsets[positions + 1] - first
        if np.all(counts == 1):
            return self.iov[first]
        ends = np.cumsum(counts)
        return self.iov[np.repeat(first - ends + counts, counts) + np.arange(ends[-1])]

    @staticmethod
    def concat(parts: list[RowIovecs]) -> RowIovecs:
        """Return the rows of ``parts`` one after the other."""
        if len(parts) == 1:
            return parts[0]
        shifts = np.cumsum([0] + [len(p.iov) for p in parts[:-1]])
        offsets = np.concatenate(
            [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)]
        )
        iov = np.concatenate([p.iov for p in parts])
        return RowIovecs(iov, offsets, tuple(o for p in parts for o in p.owners))


class _Mapping:
    """One file, open and mapped read-only; unmapped and closed once nothing uses it."""

    __slots__ = ("__weakref__", "_view", "address", "fd", "size")

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, fd)
        self.fd = fd
        size = os.fstat(fd).st_size
        self.size = size
        # the view holds the mapping (unmapped when the view goes); mmap refuses empty files
        self._view = (
            np.frombuffer(mmap.mmap(fd, size, access=mmap.ACCESS_READ), np.uint8)
            if size
            else np.empty(0, np.uint8)
        )
        self.address = int(self._view.ctypes.data)


class MappedArray:
    """An uncompressed 1-d array whose rows are handed out as addresses in mapped files.

    Parameters
    ----------
    chunks
        Where the array's chunks lie (those of its
        :class:`~annserve.server.io.chunkfiles.ChunkFileRanges`).
    dtype
        The array's dtype (little-endian or single-byte).
    name
        Names the array in error messages, e.g. ``"store.zarr: X/data"``.
    max_files
        Files kept mapped at most (:data:`MAX_MAPPED_FILES`).
    """

    def __init__(
        self, chunks: ChunkFiles, dtype: np.dtype, name: str, max_files: int = MAX_MAPPED_FILES
    ) -> None:
        self._chunks = chunks
        self.dtype = np.dtype(dtype)
        self._name = name
        self._max_files = max_files
        self._maps: OrderedDict[str, _Mapping] = OrderedDict()
        self._lock = threading.Lock()
        self._blocks = -1  # the process's blocks read from disk at the last call; -1: none yet

    def iovecs(self, starts: np.ndarray, stops: np.ndarray) -> RowIovecs:
        """Return where elements ``[starts[i], stops[i])`` lie, for each row ``i``.

        Parameters
        ----------
        starts, stops
            Shape ``(n,)``, int64, element positions; ``stops >= starts``.

        Raises
        ------
        DataLossError
            If a chunk the rows use is absent from the store, or its file cannot be
            opened or is shorter than the chunk (truncated).
        """
        c, size = self._chunks.chunk, self.dtype.itemsize
        count = np.where(stops > starts, (stops - 1) // c - starts // c + 1, 0)
        offsets = np.zeros(len(starts) + 1, np.int64)
        np.cumsum(count, out=offsets[1:])
        row = np.repeat(np.arange(len(starts)), count)
        k = starts[row] // c + (np.arange(offsets[-1]) - offsets[row])
        begin = np.maximum(starts[row], k * c)
        end = np.minimum(stops[row], (k + 1) * c)
        ks, inverse = np.unique(k, return_inverse=True)
        with self._lock:
            bases, maps = self._locate(ks.tolist(), inverse, (end - ks[inverse] * c) * size)
            self._advise(bases, maps)
        addresses = np.array([m.address for m in maps], np.uint64)[inverse]
        iov = np.empty((len(k), 2), np.uint64)
        iov[:, 0] = addresses + (bases[inverse] + (begin - k * c) * size).astype(np.uint64)
        iov[:, 1] = ((end - begin) * size).astype(np.uint64)
        return RowIovecs(iov, offsets, tuple(dict.fromkeys(maps)))

    def _locate(
        self, ks: list[int], inverse: np.ndarray, piece_ends: np.ndarray
    ) -> tuple[np.ndarray, list[_Mapping]]:
        """Return each chunk's byte offset in its file and the file's mapping, checked.

        ``piece_ends`` gives, per piece (``inverse`` its chunk), the byte after its last
        element, counted from its chunk's first: each file must hold the chunks that far.
        """
        need = np.zeros(len(ks), np.int64)
        np.maximum.at(need, inverse, piece_ends)
        bases = np.empty(len(ks), np.int64)
        maps = []
        for i, k in enumerate(ks):
            path, base = self._chunks.locate(k)
            if base is None:
                raise self._lost(
                    k, path, "is missing from the store (deleted?); its values are lost"
                )
            mapping = self._mapping(path, k)
            end = base + int(need[i])
            if end > mapping.size or end > os.fstat(mapping.fd).st_size:
                raise self._lost(k, path, "is cut short: its file is truncated")
            bases[i] = base
            maps.append(mapping)
        return bases, maps

    def _mapping(self, path: str, k: int) -> _Mapping:
        """Return the mapping of ``path``, mapping it first if need be (called locked)."""
        mapping = self._maps.get(path)
        if mapping is not None:
            self._maps.move_to_end(path)
            return mapping
        try:
            mapping = self._maps[path] = _Mapping(path)
        except OSError as e:
            raise self._lost(k, path, f"cannot be opened ({e.strerror})") from e
        if len(self._maps) > self._max_files:
            self._maps.popitem(last=False)  # unmapped once no buffer uses it
        return mapping

    def _advise(self, bases: np.ndarray, maps: list[_Mapping]) -> None:
        """Ask the kernel to fetch the chunks now (``POSIX_FADV_WILLNEED``) while reads reach disk.

        The gathers then fault in pages that are already being read, many at a time.
        Whether the disk is still read is judged from the process's blocks read since
        the last call (``getrusage``), as hints cost CPU when the data is cached.
        """
        blocks = resource.getrusage(resource.RUSAGE_SELF).ru_inblock
        from_disk = self._blocks < 0 or blocks > self._blocks
        self._blocks = blocks
        if not from_disk:
            return
        nbytes = self._chunks.chunk * self.dtype.itemsize
        for base, mapping in zip(bases.tolist(), maps, strict=True):
            length = max(0, min(nbytes, mapping.size - base))
            os.posix_fadvise(mapping.fd, base, length, os.POSIX_FADV_WILLNEED)

    def _lost(self, k: int, path: str, what: str) -> DataLossError:
        """Return the error naming the array and chunk ``k``, ``what`` saying why."""
        msg = f"{self._name}: chunk {self._chunks.describe(k)} {what}"
        logger.error("%s (file %s)", msg, path)
        return DataLossError(msg)
