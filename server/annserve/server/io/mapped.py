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
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from annserve.errors import DataLossError

if TYPE_CHECKING:
    from annserve.server.io.chunkfiles import ChunkFiles

logger = logging.getLogger(__name__)

#: Files one array keeps mapped at most; the least recently used go first.
MAX_MAPPED_FILES = 1024
#: Why a chunk cannot be served, as both readers of chunk files say it (this module's
#: and :class:`~annserve.server.io.chunkfiles.ChunkFileRanges`).
ABSENT = "is missing from the store (deleted?); its values are lost"
TRUNCATED = "is cut short: its file is truncated"


def chunk_lost(name: str, chunk: str, path: str, what: str) -> DataLossError:
    """Return the error naming array ``name``'s ``chunk`` (``what`` says why); log its file.

    Parameters
    ----------
    name
        The array, e.g. ``"store.zarr: X/data"``.
    chunk
        The chunk, relative to its array (``c/3``, ``chunk 3 of shard c/0``).
    path
        The file holding it, logged (not sent: it is the server's path).
    what
        Why, e.g. :data:`ABSENT` or :data:`TRUNCATED`.
    """
    msg = f"{name}: chunk {chunk} {what}"
    logger.error("%s (file %s)", msg, path)
    return DataLossError(msg)


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


def split_at_chunks(
    starts: np.ndarray, stops: np.ndarray, chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut element ranges ``[starts[i], stops[i])`` where chunks of ``chunk`` elements end.

    Parameters
    ----------
    starts, stops
        Shape ``(n,)``, int64, element positions in a 1-d array; ``stops >= starts``.
    chunk
        Elements per chunk.

    Returns
    -------
    offsets
        Shape ``(n + 1,)``, int64: range ``i``'s pieces are ``offsets[i]:offsets[i + 1]``.
    k
        Each piece's chunk number, int64.
    begin, end
        Each piece's elements within its chunk, ``[begin, end)``, int64.
    """
    c = chunk
    count = np.where(stops > starts, (stops - 1) // c - starts // c + 1, 0)
    offsets = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(count, out=offsets[1:])
    row = np.repeat(np.arange(len(starts)), count)
    k = starts[row] // c + (np.arange(offsets[-1]) - offsets[row])
    begin = np.maximum(starts[row], k * c) - k * c
    end = np.minimum(stops[row], (k + 1) * c) - k * c
    return offsets, k, begin, end


def iovec_array(bases: np.ndarray, begin: np.ndarray, end: np.ndarray, size: int) -> np.ndarray:
    """Return ``struct iovec`` rows (address, length in bytes) for pieces of chunks.

    Parameters
    ----------
    bases
        Shape ``(n,)``, uint64: the address of each piece's chunk.
    begin, end
        Shape ``(n,)``, int64: each piece's elements within its chunk, ``[begin, end)``.
    size
        Bytes of one element.

    Returns
    -------
    Shape ``(n, 2)``, uint64.
    """
    iov = np.empty((len(bases), 2), np.uint64)
    iov[:, 0] = bases + (begin * size).astype(np.uint64)
    iov[:, 1] = ((end - begin) * size).astype(np.uint64)
    return iov


class _Mapping:
    """One file mapped read-only; unmapped once nothing uses it (its descriptor is closed)."""

    __slots__ = ("_mm", "_view", "address", "size")

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            # mmap refuses empty files; an empty one holds nothing to gather anyway
            self._mm = (
                mmap.mmap(f.fileno(), self.size, access=mmap.ACCESS_READ) if self.size else None
            )
        # the view holds the mapping, as every buffer built from its addresses holds this
        self._view = np.frombuffer(self._mm, np.uint8) if self._mm else np.empty(0, np.uint8)
        self.address = int(self._view.ctypes.data)

    def prefetch(self, start: int, length: int) -> None:
        """Ask the kernel to read bytes ``[start, start + length)`` now (``MADV_WILLNEED``)."""
        if self._mm is not None and length > 0:
            page = start - start % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_WILLNEED, page, min(length + start - page, self.size - page))


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
        # per chunk, learnt on first use: its file (index into _paths; -1 not yet
        # located) and byte offset in it (-1: absent from the store)
        self._file_of = np.empty(0, np.int64)
        self._base = np.empty(0, np.int64)
        self._paths: list[str] = []
        self._path_ids: dict[str, int] = {}
        self._maps: OrderedDict[int, _Mapping] = OrderedDict()
        self._lock = threading.Lock()

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
        size = self.dtype.itemsize
        offsets, k, begin, end = split_at_chunks(starts, stops, self._chunks.chunk)
        with self._lock:
            self._learn(k)
            files, bases = self._file_of[k], self._base[k]
            if np.any(bases < 0):
                missing = int(k[np.argmax(bases < 0)])
                raise self._lost(missing, ABSENT)
            maps = self._checked(k, files, bases + end * size, _reading_disk())
        addresses = np.zeros(len(self._paths), np.uint64)
        for f, mapping in maps.items():
            addresses[f] = mapping.address
        iov = iovec_array(addresses[files] + bases.astype(np.uint64), begin, end, size)
        return RowIovecs(iov, offsets, tuple(maps.values()))

    def _learn(self, k: np.ndarray) -> None:
        """Locate the chunks in ``k`` not located yet (called locked)."""
        if len(k) and k.max() >= len(self._base):
            grow = int(k.max()) + 1 - len(self._base)
            self._file_of = np.r_[self._file_of, np.full(grow, -1, np.int64)]
            self._base = np.r_[self._base, np.full(grow, -1, np.int64)]
        for chunk in np.unique(k[self._file_of[k] < 0]).tolist():
            path, base = self._chunks.locate(chunk)
            if path not in self._path_ids:
                self._path_ids[path] = len(self._paths)
                self._paths.append(path)
            self._file_of[chunk] = self._path_ids[path]
            self._base[chunk] = -1 if base is None else base

    def _checked(
        self, k: np.ndarray, files: np.ndarray, ends: np.ndarray, from_disk: bool
    ) -> dict[int, _Mapping]:
        """Return the mapping of each file the pieces use, each checked to hold them.

        ``ends`` gives, per piece (in chunk ``k``, file ``files``), the byte after it in
        its file (called locked). Each file's first use, and any use while the process
        reads from disk (``from_disk``), also asks the kernel to fetch the chunks.
        """
        need = np.zeros(len(self._paths), np.int64)
        np.maximum.at(need, files, ends)
        chunks = np.unique(k)
        chunk_files = self._file_of[chunks]
        order = np.argsort(chunk_files, kind="stable")
        file_ids, first = np.unique(chunk_files[order], return_index=True)
        maps = {}
        for f, mine in zip(file_ids.tolist(), np.split(chunks[order], first[1:]), strict=True):
            mapping, fresh = self._mapping(f, int(mine[0]))
            size = min(mapping.size, _size(self._paths[f]))
            if need[f] > size:
                short = int(k[np.argmax((files == f) & (ends > size))])
                raise self._lost(short, TRUNCATED)
            if fresh or from_disk:
                self._prefetch(mapping, mine)
            maps[f] = mapping
        return maps

    def _mapping(self, f: int, k: int) -> tuple[_Mapping, bool]:
        """Return the mapping of file ``f`` and whether it is new (called locked).

        ``k`` is a chunk in the file, named if it cannot be mapped.
        """
        mapping = self._maps.get(f)
        if mapping is not None:
            self._maps.move_to_end(f)
            return mapping, False
        try:
            mapping = self._maps[f] = _Mapping(self._paths[f])
        except FileNotFoundError as e:
            raise self._lost(k, ABSENT) from e
        except OSError as e:
            raise self._lost(k, f"cannot be opened ({e.strerror})") from e
        if len(self._maps) > self._max_files:
            self._maps.popitem(last=False)  # unmapped once no buffer uses it
        return mapping, True

    def _prefetch(self, mapping: _Mapping, chunks: np.ndarray) -> None:
        """Ask the kernel to read whole chunks of one file now, many at a time.

        The gathers then find pages already read or being read instead of faulting
        them in one by one (as ``ChunkFileRanges`` advises its reads).
        """
        nbytes = self._chunks.chunk * self.dtype.itemsize
        for base in self._base[chunks].tolist():
            mapping.prefetch(base, nbytes)

    def _lost(self, k: int, what: str) -> DataLossError:
        """Return the error naming the array and chunk ``k`` (located), ``what`` saying why."""
        path = self._paths[self._file_of[k]]
        return chunk_lost(self._name, self._chunks.describe(k), path, what)


def _size(path: str) -> int:
    """Return the file's size now, bytes (0 if it is gone)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


_last_blocks = [-1]  # the process's blocks read from disk when last asked


def _reading_disk() -> bool:
    """Whether the process has read from disk since the last call (``getrusage``)."""
    blocks = resource.getrusage(resource.RUSAGE_SELF).ru_inblock
    reading, _last_blocks[0] = blocks > _last_blocks[0], blocks
    return reading
