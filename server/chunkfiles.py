"""Range reads of uncompressed 1-d zarr v3 arrays straight from their chunk files.

``annserve convert --compression none`` writes CSR ``data``/``indices`` as uncompressed
arrays (sharded or not). Their chunks are plain little-endian bytes, so an element
range is a byte range of a file: one ``preadv`` puts it straight into the preload
buffer. Going through zarr's codec pipeline instead (even the Rust ``zarrs`` one)
costs ~40 us per chunk piece plus zarr's event loop, which was half of the daemon's
read time (one epoch of 32-row chunks of the benchmark atlas: 0.18 against 0.5 CPU-s).
Every other layout (compressed, 2-d, remote, zarr v2) is read through zarr.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.codecs.bytes import Endian
from zarr.storage import LocalStore

from annserve.errors import StoreFormatError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import zarr

#: Offset and length of a chunk absent from its shard (zarr sharding spec).
_MISSING = np.uint64(2**64 - 1)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Where the bytes of each element are.

    Attributes
    ----------
    array
        The zarr array (for chunk keys).
    directory
        Directory of the array in the local store.
    chunk
        Elements per chunk file (a shard when sharded).
    inner
        Elements per chunk inside a shard; ``chunk`` when not sharded.
    index_at_end
        Whether a shard's index follows its chunks (else precedes them).
    checksum
        Whether a shard's index ends with a CRC32C of it.
    """

    array: zarr.Array
    directory: Path
    chunk: int
    inner: int
    index_at_end: bool
    checksum: bool

    @property
    def sharded(self) -> bool:
        return self.inner != self.chunk


def _plain_bytes(codecs: Sequence[object]) -> bool:
    return (len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian in (None, Endian.little))


def _layout(array: zarr.Array) -> _Layout | None:
    """Return the layout of ``array`` if its chunk files can be read directly, else None."""
    meta = array.metadata
    if (meta.zarr_format != 3 or len(array.shape) != 1 or not isinstance(array.store, LocalStore)
            or array.dtype.byteorder == ">" or array.dtype.hasobject):
        return None
    chunk = meta.chunk_grid.chunk_shape[0]
    directory = Path(array.store.root) / array.path
    if _plain_bytes(meta.codecs):
        return _Layout(array, directory, chunk, chunk, index_at_end=True, checksum=False)
    if len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    shard = meta.codecs[0]
    index = shard.index_codecs
    if not _plain_bytes(shard.codecs) or not (
            _plain_bytes(index) or (_plain_bytes(index[:1]) and len(index) == 2
                                   and isinstance(index[1], Crc32cCodec))):
        return None
    return _Layout(array, directory, chunk, shard.chunk_shape[0],
                   index_at_end=shard.index_location == ShardingCodecIndexLocation.end,
                   checksum=len(index) == 2)


class ChunkFileRanges:
    """Range reads (:class:`~annserve.server.ranges.RangeReader`) from chunk files.

    Chunk files and shards absent from the store read as the array's fill value, as
    in zarr. A shard's index is read (and its checksum checked) once and kept: the
    store must not change while it is served.
    """

    def __init__(self, layout: _Layout) -> None:
        self._layout = layout
        self._itemsize = layout.array.dtype.itemsize
        self._fill = layout.array.metadata.fill_value
        self._indexes: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, array: zarr.Array) -> ChunkFileRanges | None:
        """Return a reader of ``array``, or None if its layout needs zarr's codecs."""
        layout = _layout(array)
        return cls(layout) if layout is not None else None

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None
             ) -> np.ndarray:
        """Return the ranges concatenated, in the given order (``out`` receives them if given).

        Raises
        ------
        StoreFormatError
            If a chunk file is shorter than its chunk or a shard index is corrupt.
        """
        if out is None:
            out = np.empty(sum(b - a for a, b in ranges), self._layout.array.dtype)
        raw = memoryview(out).cast("B")
        fd, opened = -1, -1
        try:
            for file, base, start, stop, at in self._pieces(ranges):
                if file != opened:
                    if fd >= 0:
                        os.close(fd)
                    fd, opened = self._open(file), file
                if fd < 0 or base is None:
                    out[at:at + stop - start] = self._fill
                    continue
                self._pread(fd, raw[at * self._itemsize:(at + stop - start) * self._itemsize],
                            base + start * self._itemsize, file)
        finally:
            if fd >= 0:
                os.close(fd)
        return out

    def _pieces(self, ranges: Sequence[tuple[int, int]]
                ) -> Iterator[tuple[int, int | None, int, int, int]]:
        """Cut ranges at chunk boundaries.

        Yields ``(file, base, start, stop, at)``: chunk file number, byte offset in that
        file of the element at ``start`` (None for an absent chunk), the elements
        ``[start, stop)`` counted from the inner chunk's first, and their output position.
        """
        chunk, inner = self._layout.chunk, self._layout.inner
        at = 0
        for a, b in ranges:
            pos = a
            while pos < b:
                first = pos - pos % inner
                stop = min(b, first + inner)
                file = pos // chunk
                base = self._chunk_offset(file, (first - file * chunk) // inner)
                yield file, base, pos - first, stop - first, at
                at += stop - pos
                pos = stop

    def _chunk_offset(self, file: int, inner: int) -> int | None:
        """Byte offset of inner chunk ``inner`` in chunk file ``file``; None if absent."""
        if not self._layout.sharded:
            return 0
        index = self._indexes.get(file)
        if index is None and file not in self._indexes:
            with self._lock:
                index = self._indexes[file] = self._read_index(file)
        if index is None or index[inner, 0] == _MISSING:
            return None
        return int(index[inner, 0])

    def _path(self, file: int) -> Path:
        return self._layout.directory / self._layout.array.metadata.encode_chunk_key((file,))

    def _open(self, file: int) -> int:
        """Open chunk file ``file`` read-only; -1 if the store has none (fill value)."""
        try:
            return os.open(self._path(file), os.O_RDONLY)
        except FileNotFoundError:
            return -1

    def _pread(self, fd: int, into: memoryview, offset: int, file: int) -> None:
        if os.preadv(fd, [into], offset) != len(into):
            msg = f"{self._path(file)}: chunk file is shorter than its chunks (truncated store?)"
            raise StoreFormatError(msg)

    def _read_index(self, file: int) -> np.ndarray | None:
        """Read and check the ``(offset, nbytes)`` index of one shard; None if no shard."""
        layout = self._layout
        n = layout.chunk // layout.inner
        size = 16 * n + 4 * layout.checksum
        fd = self._open(file)
        if fd < 0:
            return None
        try:
            end = os.fstat(fd).st_size
            raw = bytearray(size)
            self._pread(fd, memoryview(raw), max(0, end - size) if layout.index_at_end else 0, file)
        finally:
            os.close(fd)
        body = bytes(raw[:16 * n])
        if layout.checksum and google_crc32c.value(body) != int.from_bytes(raw[16 * n:], "little"):
            msg = f"{self._path(file)}: shard index checksum mismatch (corrupt store?)"
            raise StoreFormatError(msg)
        index = np.frombuffer(body, "<u8").reshape(n, 2)
        present = index[:, 0] != _MISSING
        expected = layout.inner * self._itemsize
        if np.any(index[present, 1] != expected) or np.any(index[present].sum(axis=1) > end):
            msg = (f"{self._path(file)}: shard holds chunks that are not {expected} plain "
                   "bytes (corrupt store?)")
            raise StoreFormatError(msg)
        return index
