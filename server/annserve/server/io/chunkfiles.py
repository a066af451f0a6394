"""Range reads of uncompressed 1-d arrays straight from the files that hold their chunks.

CSR ``data``/``indices`` stored without compression (``annserve convert --compression
none``, anndata's default h5ad) are plain little-endian bytes, chunk after chunk: an
element range is a byte range of a file, and one ``preadv`` puts it straight into the
preload buffer. Going through the storage library instead costs far more per range:
zarr's codec pipeline (even the Rust ``zarrs`` one) ~40 us per chunk piece plus its
event loop, HDF5 its chunk cache and selection machinery. Measured on the benchmark
atlas, one epoch of 32-row chunks: zarr 0.5 against 0.2 CPU-s; h5ad 1.5 against 0.4.
Other layouts (compressed or filtered, 2-d, remote, zarr v2, HDF5 external or virtual
storage) are read through zarr or h5py.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from typing import TYPE_CHECKING, NamedTuple, Protocol

import h5py
import numpy as np

from annserve.errors import DataLossError
from annserve.server.io._zarr import MISSING, chunk_file_layout, chunk_label
from annserve.server.io.mapped import ABSENT, TRUNCATED, MappedArray, chunk_lost

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import zarr

    from annserve.server.io._zarr import ChunkFileLayout

logger = logging.getLogger(__name__)

#: Chunk file paths kept per array (an unsharded array may have very many files).
_MAX_PATHS = 1 << 14


class ChunkFiles(Protocol):
    """Where each chunk of a 1-d array lies: a file and a byte offset."""

    #: Elements per chunk.
    chunk: int

    def locate(self, k: int) -> tuple[str, int | None]:
        """Return the file holding chunk ``k`` and the chunk's byte offset in it.

        The offset is None when the store holds no such chunk (it reads as the fill
        value); so does a file that does not exist.
        """
        ...

    def describe(self, k: int) -> str:
        """Name chunk ``k`` in messages, relative to its array (``c/3``, ``chunk 3``)."""
        ...


class ChunkFileRanges:
    """Range reads (:class:`~annserve.server.io.ranges.RangeReader`) from chunk files.

    Parameters
    ----------
    chunks
        Where the chunks are.
    dtype
        The array's dtype (little-endian or single-byte).
    fill_value
        Value of elements of absent chunks.
    name
        Names the array in error messages, e.g. ``"store.zarr: X/data"``.
    complete
        Every chunk a read touches must be stored (CSR ``data``/``indices``): an absent
        one is lost data, not fill values.
    """

    def __init__(
        self,
        chunks: ChunkFiles,
        dtype: np.dtype,
        fill_value: object,
        name: str,
        complete: bool = False,
    ) -> None:
        self._chunks = chunks
        self._dtype = np.dtype(dtype)
        self._fill = fill_value
        self._name = name
        self._complete = complete
        self._from_disk = True  # whether the last read went to the disk (first: assume so)
        self._mapped: MappedArray | None = None
        self._mapped_lock = threading.Lock()

    @classmethod
    def open(
        cls, array: zarr.Array | h5py.Dataset, name: str, complete: bool = False
    ) -> ChunkFileRanges | None:
        """Return a reader of ``array``, or None if its layout needs zarr or h5py to decode.

        Also None off Linux (no ``preadv``, ``posix_fadvise`` or per-thread ``getrusage``).
        ``name`` and ``complete`` are those of the reader.
        """
        if not (hasattr(os, "preadv") and hasattr(resource, "RUSAGE_THREAD")):
            return None
        chunks: ChunkFiles | None
        if isinstance(array, h5py.Dataset):
            chunks = _H5Chunks.of(array)
            fill = array.fillvalue
        else:
            layout = chunk_file_layout(array) if _little_endian(array.dtype) else None
            chunks = None if layout is None else _ZarrChunks(layout, array.dtype.itemsize, name)
            fill = None if layout is None else layout.fill_value
        if chunks is None:
            return None
        reader = cls(chunks, array.dtype, fill, name, complete)
        return reader if reader._agrees_with(array) else None

    def _agrees_with(self, array: zarr.Array | h5py.Dataset) -> bool:
        """Check the array's first elements read the same through its library."""
        n = min(array.shape[0], 4096)
        if np.array_equal(self.read([(0, n)]), array[:n]):
            return True
        logger.warning(
            "%s: chunk file layout not understood; reading it through %s",
            array,
            type(array).__module__.split(".")[0],
        )
        return False

    def mapped(self) -> MappedArray:
        """Return the array mapped from the same files (made on first use, then kept)."""
        with self._mapped_lock:
            if self._mapped is None:
                self._mapped = MappedArray(self._chunks, self._dtype, self._name)
            return self._mapped

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        """Return the ranges concatenated, in the given order (``out`` receives them if given).

        Raises
        ------
        DataLossError
            If a chunk file is shorter than its chunks, cannot be read, or its shard
            index is corrupt; or, when ``complete``, a chunk the ranges touch is absent.
        """
        if out is None:
            out = np.empty(sum(b - a for a, b in ranges), self._dtype)
        raw = out.data.cast("B")
        size = self._dtype.itemsize
        pieces = list(self._pieces(ranges))
        blocks = _blocks_read()
        fds: dict[str, int] = {}  # each file opened once per call; -1: the store has none
        try:
            for piece in pieces:
                if piece.path not in fds:
                    fds[piece.path] = self._open(piece)
            runs = list(self._runs(pieces, fds))
            if self._from_disk:
                self._advise(runs, fds)
            for run in runs:
                first, last = run[0], run[-1]
                at, stop = first.at * size, (last.at + last.stop - last.start) * size
                if first.base is None:
                    self._absent(first)
                    out[first.at : stop // size] = self._fill
                else:
                    self._pread(fds[first.path], raw[at:stop], run)
        finally:
            for fd in fds.values():
                if fd >= 0:
                    os.close(fd)
        self._from_disk = _blocks_read() > blocks
        return out

    def _advise(self, runs: list[list[_Piece]], fds: dict[str, int]) -> None:
        """Ask the kernel to fetch every piece now (``POSIX_FADV_WILLNEED``).

        Reads that miss the page cache then run many at a time instead of one
        ``preadv`` after another: an epoch of the benchmark atlas from disk took
        1.3-2.0 s instead of 2.3 s. The hints cost ~0.1 CPU-s per epoch when the data
        is cached, so :meth:`read` gives them only while its reads reach the disk.
        """
        size = self._dtype.itemsize
        for run in runs:
            first, last = run[0], run[-1]
            if first.base is not None and last.base is not None:
                start = first.base + first.start * size
                stop = last.base + last.stop * size
                os.posix_fadvise(fds[first.path], start, stop - start, os.POSIX_FADV_WILLNEED)

    def _pieces(self, ranges: Sequence[tuple[int, int]]) -> Iterator[_Piece]:
        """Cut ranges at chunk boundaries, in output order."""
        chunk = self._chunks.chunk
        at = 0
        for a, b in ranges:
            pos = a
            while pos < b:
                k = pos // chunk
                stop = min(b, (k + 1) * chunk)
                path, base = self._chunks.locate(k)
                yield _Piece(k, path, base, pos - k * chunk, stop - k * chunk, at)
                at += stop - pos
                pos = stop

    def _runs(self, pieces: list[_Piece], fds: dict[str, int]) -> Iterator[list[_Piece]]:
        """Group consecutive pieces that lie back to back in one file (read by one ``preadv``).

        Pieces of absent chunks (or of a file the store lacks, whose ``fds`` entry is -1)
        come alone, with ``base`` None.
        """
        size = self._dtype.itemsize
        run: list[_Piece] = []
        end = -1  # byte after the run's last piece in its file; -1: nothing to extend
        for piece in pieces:
            if fds[piece.path] < 0:
                piece = piece._replace(base=None)
            start = -2 if piece.base is None else piece.base + piece.start * size
            if run and (start != end or piece.path != run[-1].path):
                yield run
                run = []
            run.append(piece)
            end = -1 if piece.base is None else piece.base + piece.stop * size
        if run:
            yield run

    def _lost(self, piece: _Piece, what: str) -> DataLossError:
        """Return the error naming the array and the chunk of ``piece``, ``what`` saying why."""
        return chunk_lost(self._name, self._chunks.describe(piece.k), piece.path, what)

    def _absent(self, piece: _Piece) -> None:
        """Raise :class:`DataLossError` for an absent chunk when the array must be complete."""
        if self._complete:
            raise self._lost(piece, ABSENT)

    def _open(self, piece: _Piece) -> int:
        """Open the chunk file of ``piece`` read-only; -1 if the store has none."""
        try:
            return os.open(piece.path, os.O_RDONLY)
        except FileNotFoundError:
            return -1
        except OSError as e:
            raise self._lost(piece, f"cannot be opened ({e.strerror})") from e

    def _pread(self, fd: int, into: memoryview, run: list[_Piece]) -> None:
        """Read ``into`` from the pieces of ``run`` (back to back in one file), all of it."""
        first = run[0]
        assert first.base is not None  # absent chunks are filled, not read
        try:
            n = os.preadv(fd, [into], first.base + first.start * self._dtype.itemsize)
        except OSError as e:
            raise self._lost(first, f"cannot be read ({e.strerror})") from e
        if n != len(into):
            size = self._dtype.itemsize
            short = next(p for p in run if (p.at + p.stop - p.start - first.at) * size > n)
            raise self._lost(short, TRUNCATED)


class _Piece(NamedTuple):
    """Elements ``[start, stop)`` of chunk ``k`` (counted from its first), going to ``at``.

    A named tuple: one is made per chunk a range touches, and a frozen dataclass costs
    several times more to make.
    """

    k: int
    """The chunk."""
    path: str
    """Its file."""
    base: int | None
    """Its byte offset in the file; None if the store holds no such chunk."""
    start: int
    """First element of the piece, counted from the chunk's first."""
    stop: int
    """Element after the piece's last, counted from the chunk's first."""
    at: int
    """Position of the piece in the output, elements."""


def _blocks_read() -> int:
    """512-byte blocks this thread has read from disk so far (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_inblock


def _little_endian(dtype: np.dtype) -> bool:
    return not dtype.hasobject and (dtype.itemsize == 1 or dtype.newbyteorder("<") == dtype)


class _H5Chunks:
    """Chunks of an unfiltered HDF5 dataset, contiguous (one chunk) or chunked."""

    def __init__(self, path: str, chunk: int, offsets: np.ndarray) -> None:
        self._path = path
        self.chunk = chunk
        self._offsets = offsets  # byte offset of each chunk, -1 where unallocated

    @classmethod
    def of(cls, ds: h5py.Dataset) -> _H5Chunks | None:
        plist = ds.id.get_create_plist()
        if (
            ds.ndim != 1
            or not _little_endian(ds.dtype)
            or plist.get_nfilters() != 0
            or plist.get_external_count() != 0
            or len(ds) == 0
        ):
            return None
        layout = plist.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = ds.id.get_offset()
            return cls(ds.file.filename, len(ds), np.array([-1 if offset is None else offset]))
        if layout != h5py.h5d.CHUNKED:  # compact or virtual
            return None
        chunk = ds.chunks[0]
        offsets = np.full(-(-len(ds) // chunk), -1, np.int64)
        sizes = []

        def visit(info: h5py.h5d.StoreInfo) -> None:
            offsets[info.chunk_offset[0] // chunk] = info.byte_offset
            sizes.append(info.size)

        ds.id.chunk_iter(visit)
        if any(s != chunk * ds.dtype.itemsize for s in sizes):
            return None
        return cls(ds.file.filename, chunk, offsets)

    def locate(self, k: int) -> tuple[str, int | None]:
        offset = int(self._offsets[k])
        return self._path, (offset if offset >= 0 else None)

    def describe(self, k: int) -> str:
        return str(k)


class _ZarrChunks:
    """Chunks of an uncompressed zarr v3 array in a local store, sharded or not.

    A shard's index is read (and its checksum checked) once and kept: the store must
    not change while it is served.
    """

    def __init__(self, layout: ChunkFileLayout, itemsize: int, name: str) -> None:
        self._layout = layout
        self._itemsize = itemsize
        self._name = name
        self.chunk = layout.chunk
        self._per_file = layout.per_file // layout.chunk
        # each chunk's byte offset in shard ``file`` (None: absent), as Python ints: looked
        # up per chunk a read touches, several times faster than numpy scalars
        self._offsets: dict[int, list[int | None] | None] = {}
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()

    def _path(self, file: int) -> str:
        """Path of chunk (or shard) file ``file``; kept, as building it costs ~10 us."""
        path = self._paths.get(file)
        if path is None:
            if len(self._paths) >= _MAX_PATHS:
                self._paths.clear()
            path = self._paths[file] = str(self._layout.directory / self._layout.chunk_key(file))
        return path

    def locate(self, k: int) -> tuple[str, int | None]:
        file, inner = divmod(k, self._per_file)
        path = self._path(file)
        if self._layout.shard is None:
            return path, 0
        offsets = self._offsets.get(file)
        if offsets is None and file not in self._offsets:
            with self._lock:
                offsets = self._offsets[file] = self._read_index(file, path)
        return path, None if offsets is None else offsets[inner]

    def describe(self, k: int) -> str:
        file, inner = divmod(k, self._per_file)
        return chunk_label(self._layout.chunk_key(file), inner, self._per_file)

    def _read_index(self, file: int, path: str) -> list[int | None] | None:
        """Read and check the index of shard ``file``: each chunk's byte offset; None if no shard.

        Raises
        ------
        DataLossError
            If the index is corrupt or truncated, or lists chunks that are not
            ``chunk`` elements of plain bytes.
        """
        shard = self._layout.shard
        assert shard is not None  # only sharded arrays have shard indexes
        where = f"{self._name}: shard {self._layout.chunk_key(file)}"
        nbytes = shard.nbytes(self._per_file)
        try:
            with open(path, "rb") as f:
                end = os.fstat(f.fileno()).st_size
                f.seek(max(0, end - nbytes) if shard.at_end else 0)
                raw = f.read(nbytes)
        except FileNotFoundError:
            return None
        except OSError as e:
            msg = f"{where}: cannot be read ({e.strerror})"
            raise DataLossError(msg) from e
        index = shard.decode(raw, self._per_file, end, where)
        expected = self.chunk * self._itemsize
        if np.any(index[index[:, 0] != MISSING, 1] != expected):
            msg = f"{where}: holds chunks that are not {expected} plain bytes (corrupt shard?)"
            raise DataLossError(msg)
        present = (index[:, 0] != MISSING).tolist()
        return [o if p else None for o, p in zip(index[:, 0].tolist(), present, strict=True)]
