"""Read many ``[start, stop)`` ranges of one on-disk array (h5py dataset or zarr array).

Stored data that is missing or does not decode is never served: a read that fails
raises :class:`~annserve.errors.DataLossError` (or
:class:`~annserve.errors.StoreFormatError` for a layout that cannot be read) naming
the array and the chunk, the library's exception chained and logged; and arrays that
must be complete (CSR ``data``/``indices``/``indptr``) are checked when opened
(:func:`check_stored`) and on every read, as zarr reads an absent chunk as the fill value.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import h5py
import numpy as np
import zarr

from annserve.errors import AnnServeError, DataLossError, StoreFormatError
from annserve.server.io._zarr import ZARRS_PIPELINE, ZarrRanges, absent_chunks, chunk_name
from annserve.server.io.cache import CachedRanges, active_cache
from annserve.server.io.chunkfiles import ChunkFileRanges

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annserve.server.io.cache import ChunkCache

__all__ = ["ZARRS_PIPELINE", "RangeReader", "check_stored", "range_reader", "row_runs"]

logger = logging.getLogger(__name__)

#: Chunks a failed read tries one by one to find the one that fails.
MAX_PROBES = 256
#: Absent chunks named in a message.
MAX_NAMED = 5


class RangeReader(Protocol):
    """Reads several ``[start, stop)`` element ranges of one 1-d or 2-d on-disk array."""

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        """Return the ranges concatenated along axis 0, in the given order.

        ``out``, when given, receives them (C-contiguous, the array's dtype, the total
        length along axis 0) and is returned.
        """
        ...


class _H5Ranges:
    """Range reads of an h5py dataset: one HDF5 read of the union of the ranges' hyperslabs.

    A single ``H5Dread`` over a multi-hyperslab selection costs about half of one
    high-level h5py read per range (measured on 256 ranges of ~32 CSR rows).
    """

    def __init__(self, dataset: h5py.Dataset, name: str) -> None:
        plist = dataset.id.get_create_plist()
        for i in range(plist.get_nfilters()):
            code, _, _, label = plist.get_filter(i)
            if not h5py.h5z.filter_avail(code):
                msg = (
                    f"{name} is compressed with HDF5 filter {code} "
                    f"({label.decode(errors='replace')}), which is not installed"
                )
                raise StoreFormatError(msg)
        self._ds = dataset

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        ranges = [(a, b) for a, b in ranges if b > a]
        tail = self._ds.shape[1:]
        if out is None:
            out = np.empty((sum(b - a for a, b in ranges), *tail), self._ds.dtype)
        if not ranges:
            return out
        file_space = self._ds.id.get_space()
        file_space.select_none()
        for a, b in ranges:
            file_space.select_hyperslab(
                (a, *(0,) * len(tail)), (b - a, *tail), op=h5py.h5s.SELECT_OR
            )
        self._ds.id.read(h5py.h5s.create_simple(out.shape), file_space, out)
        return out


class _Reported:
    """A range reader of h5py or zarr whose failures name the array and the chunk.

    A read that raises is retried chunk by chunk (up to :data:`MAX_PROBES` chunks) to
    find the chunk that fails; the error is logged with the library's traceback and
    raised as :class:`DataLossError` (:class:`StoreFormatError` for a layout the
    library cannot read), the library's exception chained.
    """

    def __init__(self, reader: RangeReader, array: h5py.Dataset | zarr.Array[Any], name: str):
        self._reader = reader
        self._array = array
        self._name = name
        chunks = array.chunks
        self._chunk = int(chunks[0]) if chunks else max(1, int(array.shape[0]))

    def read(self, ranges: Sequence[tuple[int, int]], out: np.ndarray | None = None) -> np.ndarray:
        """Read as the wrapped reader does.

        Raises
        ------
        DataLossError
            If the library cannot read or decode a stored chunk the ranges touch.
        StoreFormatError
            If the library cannot read the array's layout (``NotImplementedError``).
        """
        try:
            return self._reader.read(ranges, out)
        except (AnnServeError, MemoryError):
            raise
        except Exception as e:  # h5py, zarr, zarrs and the codecs raise many types
            raise self._failure(ranges, e) from e

    def _failure(self, ranges: Sequence[tuple[int, int]], error: Exception) -> AnnServeError:
        c = self._chunk
        touched = sorted({k for a, b in ranges if b > a for k in range(a // c, -(-b // c))})
        culprit = next((k for k in touched[:MAX_PROBES] if not self._reads(k)), None)
        if culprit is not None:
            where = self._describe(culprit)
        elif touched:
            where = f"one of {self._describe(touched[0])} to {self._describe(touched[-1])}"
        else:
            where = "a chunk"
        logger.error("%s: reading %s failed", self._name, where, exc_info=error)
        if isinstance(error, NotImplementedError):
            msg = f"{self._name}: {where} is stored in a layout annserve cannot read"
            return StoreFormatError(msg)
        msg = f"{self._name}: {where} cannot be read: its stored data is corrupt or truncated"
        return DataLossError(msg)

    def _reads(self, k: int) -> bool:
        """Whether chunk ``k`` (along axis 0) reads on its own."""
        try:
            self._array[k * self._chunk : (k + 1) * self._chunk]
        except Exception:  # noqa: BLE001  (any failure marks the chunk)
            return False
        return True

    def _describe(self, k: int) -> str:
        if len(self._array.shape) > 1:
            return f"rows {k * self._chunk}-{(k + 1) * self._chunk - 1}"
        if isinstance(self._array, zarr.Array):
            return f"chunk {chunk_name(self._array, k)}"
        return f"chunk {k}"


def _default_name(array: h5py.Dataset | zarr.Array[Any]) -> str:
    if isinstance(array, h5py.Dataset):
        return f"{array.file.filename}: {array.name.lstrip('/')}"
    return str(array.store_path)


def range_reader(
    array: h5py.Dataset | zarr.Array[Any],
    name: str | None = None,
    complete: bool = False,
    cache: ChunkCache | None = None,
) -> RangeReader:
    """Return the range reader suited to an h5py dataset or a zarr array.

    Uncompressed 1-d arrays in local files are read straight from them
    (:class:`~annserve.server.io.chunkfiles.ChunkFileRanges`); others through h5py or
    zarr's codec pipeline, and, given a ``cache``, 1-d ones that must be ``complete``
    (CSR ``data``/``indices``) through it
    (:class:`~annserve.server.io.cache.CachedRanges`: each chunk decoded once while
    it stays cached).

    Parameters
    ----------
    array
        The array.
    name
        Names it in error messages, e.g. ``"store.zarr: X/data"`` (default: its path).
    complete
        Every chunk a read touches must be stored (1-d CSR arrays): an absent one is
        lost data, not the fill value.
    cache
        Keeps decoded chunks of complete 1-d arrays read through h5py or zarr (default:
        that of the enclosing :func:`~annserve.server.io.cache.caching` block, if any);
        without one, or with a bound of 0 bytes, every read decodes.

    Raises
    ------
    StoreFormatError
        If the array is compressed with an HDF5 filter that is not installed.
    """
    name = name or _default_name(array)
    direct = ChunkFileRanges.open(array, name, complete)
    if direct is not None:
        return direct
    reader: RangeReader
    if isinstance(array, h5py.Dataset):
        reader = _Reported(_H5Ranges(array, name), array, name)
    else:
        reader = _Reported(ZarrRanges(array, name, complete), array, name)
    cache = active_cache() if cache is None else cache
    if cache is None or cache.max_bytes == 0 or not complete or len(array.shape) != 1:
        return reader
    chunks = array.chunks
    chunk = int(chunks[0]) if chunks else max(1, int(array.shape[0]))
    return CachedRanges(reader, cache, chunk, int(array.shape[0]), np.dtype(array.dtype))


def check_stored(array: h5py.Dataset | zarr.Array[Any], stop: int, name: str) -> None:
    """Check that the chunks holding elements ``[0, stop)`` of a 1-d array are stored.

    Costs a listing of the array's keys (zarr) or of its allocated chunks (HDF5), and
    a read of each shard index (sharded zarr, 16 bytes per chunk); no data is read.

    Parameters
    ----------
    array
        A 1-d array, e.g. CSR ``data``.
    stop
        Elements that must be stored, counted from the first (``indptr[-1]``).
    name
        Names the array in error messages, e.g. ``"store.zarr: X/data"``.

    Raises
    ------
    DataLossError
        If a chunk is absent, or a shard index is corrupt or points past its file. An
        absent chunk is refused even where it may have held only the fill value (zarr
        skips writing such chunks unless ``write_empty_chunks`` is set): a run of
        explicit zeros in ``data`` or of column-0 entries in ``indices`` cannot be told
        apart from lost data.
    """
    if isinstance(array, h5py.Dataset):
        absent = _h5_absent_chunks(array, stop)
    else:
        absent = absent_chunks(array, stop, name)
    if absent:
        named = ", ".join(absent[:MAX_NAMED])
        more = f" and {len(absent) - MAX_NAMED} more" if len(absent) > MAX_NAMED else ""
        msg = (
            f"{name}: {len(absent)} chunk(s) holding its first {stop} elements are missing "
            f"from the store (lost, or never written): {named}{more}; if its writer left out "
            "chunks holding only the fill value, rewrite the store with "
            "zarr.config.set({'array.write_empty_chunks': True})"
        )
        raise DataLossError(msg)


def _h5_absent_chunks(ds: h5py.Dataset, stop: int) -> list[str]:
    """Name the chunks holding elements ``[0, stop)`` of a 1-d dataset that are unallocated."""
    plist = ds.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        allocated = ds.id.get_offset() is not None or plist.get_external_count() > 0
        return [] if allocated or stop == 0 else ["0"]
    if layout != h5py.h5d.CHUNKED:  # compact (in the header) or virtual
        return []
    chunk = ds.chunks[0]
    stored = np.zeros(-(-stop // chunk), bool)

    def visit(info: h5py.h5d.StoreInfo) -> None:
        k = info.chunk_offset[0] // chunk
        if k < len(stored):
            stored[k] = True

    ds.id.chunk_iter(visit)
    return [str(k) for k in np.flatnonzero(~stored)]


def row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split strictly increasing row indices into maximal ``[start, stop)`` runs.

    Parameters
    ----------
    rows
        Shape ``(n,)``, integer, strictly increasing.

    Returns
    -------
    Runs in increasing order; their lengths add up to ``n``.
    """
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.r_[0, breaks]]
    stops = rows[np.r_[breaks - 1, len(rows) - 1]] + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))
