"""A CSR or dense matrix element (X or a layer) of an AnnData store, read by rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np
import zarr

from annserve.errors import StoreFormatError
from annserve.server.io.cache import CachedRanges
from annserve.server.io.chunkfiles import ChunkFileRanges
from annserve.server.io.elements import array_at, attr_ints, is_array
from annserve.server.io.mapped import RowIovecs
from annserve.server.io.ranges import check_stored, range_reader, row_runs

if TYPE_CHECKING:
    from annserve.server.format import Empty
    from annserve.server.io.elements import ArrayNode, GroupNode
    from annserve.server.io.ranges import RangeReader


@dataclass(frozen=True, slots=True)
class CSRRows:
    """CSR rows held in memory, in the order they were asked for.

    Attributes
    ----------
    indptr
        Row offsets into ``indices``/``data``, shape ``(n_rows + 1,)``, int64, starting at 0.
    indices
        Column (gene) index of each non-zero, shape ``(nnz,)``, the store's integer dtype
        (or uint16 from :meth:`CSRMatrix.read_rows_narrow`).
    data
        Value of each non-zero, shape ``(nnz,)``, the store's dtype (or uint16, likewise).
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class LocatedCSR:
    """CSR rows left in the store's files, mapped: where each row's non-zeros lie.

    What :meth:`CSRMatrix.locate_rows` gives instead of reading rows into memory;
    only the kernel may copy them (:class:`annserve.wire.Iovecs`).

    Attributes
    ----------
    lengths
        Non-zeros of each row, shape ``(n_rows,)``, int64.
    indices, data
        Where each row's column indices and values lie: in the store's mapped files,
        or in the decoded-chunk cache.
    index_dtype, dtype
        The dtypes of ``indices`` and ``data`` where they lie: the stored ones, or
        uint16 where the cache holds them narrowed.
    """

    lengths: np.ndarray
    indices: RowIovecs
    data: RowIovecs
    index_dtype: np.dtype
    dtype: np.dtype
    sparse = True

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' indices and values."""
        return int(self.lengths.sum()) * (self.index_dtype.itemsize + self.dtype.itemsize)

    @staticmethod
    def concat(parts: list[LocatedCSR]) -> LocatedCSR | None:
        """Return the rows of ``parts`` one after the other; None if their dtypes differ."""
        first = parts[0]
        if any(p.index_dtype != first.index_dtype or p.dtype != first.dtype for p in parts):
            return None
        return LocatedCSR(
            np.concatenate([p.lengths for p in parts]),
            RowIovecs.concat([p.indices for p in parts]),
            RowIovecs.concat([p.data for p in parts]),
            first.index_dtype,
            first.dtype,
        )


@dataclass(frozen=True, slots=True)
class DenseRows:
    """Dense rows held in memory, shape ``(n_rows, n_vars)``, the store's dtype."""

    values: np.ndarray


class CSRMatrix:
    """A CSR matrix element; its ``indptr`` is held in memory (8 bytes per row).

    Attributes
    ----------
    shape
        ``(n_obs, n_vars)``.
    dtype
        dtype of the stored values.
    index_dtype
        dtype of the stored column indices.
    nbytes
        Bytes all rows take once read (data, indices and indptr as :class:`CSRRows`).
    """

    sparse = True

    def __init__(self, group: GroupNode, where: str = "CSR matrix") -> None:
        """Open the matrix; ``where`` names it in messages, e.g. ``"store.h5ad: X"``.

        Raises
        ------
        StoreFormatError
            If ``indptr`` is not a valid row index into ``data``/``indices``.
        DataLossError
            If a chunk of ``data``/``indices`` that ``indptr`` says holds non-zeros, or a
            chunk of ``indptr``, is absent (:func:`~annserve.server.io.ranges.check_stored`).
        """
        self.shape = attr_ints(group.attrs, "shape", where)
        data, indices, indptr = (array_at(group, k, where) for k in ("data", "indices", "indptr"))
        self.dtype = np.dtype(data.dtype)
        self.index_dtype = np.dtype(indices.dtype)
        # an empty matrix may have an indptr of zeros that zarr left unwritten
        check_stored(indptr, indptr.shape[0] if data.shape[0] else 0, f"{where}/indptr")
        self._indptr = np.asarray(indptr[...], dtype=np.int64)
        nnz = _checked_nnz(self._indptr, self.shape[0], min(data.shape[0], indices.shape[0]), where)
        self.nbytes = nnz * (self.dtype.itemsize + self.index_dtype.itemsize) + 8 * self.shape[0]
        check_stored(data, nnz, f"{where}/data")
        check_stored(indices, nnz, f"{where}/indices")
        self._indices = range_reader(indices, f"{where}/indices", complete=True)
        self._data = range_reader(data, f"{where}/data", complete=True)

    @property
    def cached(self) -> bool:
        """Whether the values are read through the decoded-chunk cache (compressed arrays)."""
        return isinstance(self._data, CachedRanges)

    def nnz(self, rows: np.ndarray) -> int:
        """Non-zeros in the given rows (no data read)."""
        return int((self._indptr[rows + 1] - self._indptr[rows]).sum())

    def read_rows(self, rows: np.ndarray, out: CSRRows | None = None) -> CSRRows:
        """Read rows, one range read per run of consecutive rows.

        Parameters
        ----------
        rows
            Row indices, shape ``(n,)``, int64, strictly increasing.
        out
            Arrays to read ``indices`` and ``data`` into (their lengths :meth:`nnz`, the
            store's dtypes); its ``indptr`` is not used.
        """
        indptr, runs = self._runs(rows)
        return CSRRows(
            indptr,
            self._indices.read(runs, None if out is None else out.indices),
            self._data.read(runs, None if out is None else out.data),
        )

    def read_rows_narrow(self, rows: np.ndarray, empty: Empty = np.empty) -> CSRRows:
        """Read rows as :meth:`read_rows`, ``indices`` and ``data`` uint16 where they are held so.

        An array read through the decoded-chunk cache comes back uint16 when every
        chunk the rows touch is cached narrowed
        (:meth:`~annserve.server.io.cache.CachedRanges.read_narrow`): what the
        ``compact`` encoding sends for counts and up to 65,536 genes, with no widening
        in between. Other arrays come back in the store's dtypes.

        Parameters
        ----------
        rows
            Row indices, shape ``(n,)``, int64, strictly increasing.
        empty
            Allocates ``indices`` and ``data``, ``empty(shape, dtype)``.
        """
        indptr, runs = self._runs(rows)
        indices = _read_narrow(self._indices, runs, self.index_dtype, empty)
        return CSRRows(indptr, indices, _read_narrow(self._data, runs, self.dtype, empty))

    def _runs(self, rows: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Return the rows' indptr, from 0, and the element ranges of their runs."""
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(stops - starts, out=indptr[1:])
        runs = [(int(self._indptr[a]), int(self._indptr[b])) for a, b in row_runs(rows)]
        return indptr, runs

    def locate_rows(self, rows: np.ndarray, narrow: bool = False) -> LocatedCSR | None:
        """Locate rows in the memory ``indices`` and ``data`` lie in instead of reading them.

        Parameters
        ----------
        rows
            Row indices, shape ``(n,)``, int64, strictly increasing.
        narrow
            Chunks the decoded-chunk cache holds as uint16 may be located so (the
            ``compact`` encoding's dtypes for counts and up to 65,536 genes).

        Returns
        -------
        The rows, in order; None unless both arrays are read straight from their
        files (uncompressed, local: :class:`~annserve.server.io.chunkfiles.ChunkFileRanges`)
        or lie in the decoded-chunk cache in one dtype each, the stored one unless
        ``narrow`` (:meth:`~annserve.server.io.cache.CachedRanges.iovecs`; not before an
        array's first read).

        Raises
        ------
        DataLossError
            If a chunk the rows use is absent, or its file is truncated or cannot be
            opened, or a chunk to cache cannot be decoded.
        """
        starts, stops = self._indptr[rows], self._indptr[rows + 1]
        # values first: they are what the cache narrows, so what most often says no
        data = _locate(self._data, self.dtype, starts, stops, narrow)
        indices = _locate(self._indices, self.index_dtype, starts, stops, narrow) if data else None
        if indices is None or data is None:
            return None
        return LocatedCSR(stops - starts, indices[0], data[0], indices[1], data[1])


class DenseMatrix:
    """A dense 2-d matrix element; ``nbytes``: bytes of all rows once read."""

    sparse = False

    def __init__(self, array: ArrayNode, where: str = "dense matrix") -> None:
        """Open the matrix; ``where`` names it in messages, e.g. ``"store.h5ad: X"``.

        Absent chunks read as the fill value: zarr leaves out chunks of zeros.
        """
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.nbytes = self.shape[0] * self.shape[1] * self.dtype.itemsize
        self._reader: RangeReader = range_reader(array, where)

    def read_rows(self, rows: np.ndarray, out: DenseRows | None = None) -> DenseRows:
        """Read rows, into ``out`` when given; see :meth:`CSRMatrix.read_rows`."""
        return DenseRows(self._reader.read(row_runs(rows), None if out is None else out.values))


def _checked_nnz(indptr: np.ndarray, n_obs: int, stored: int, where: str) -> int:
    """Return the non-zeros ``indptr`` counts (its last entry), once checked.

    Parameters
    ----------
    indptr
        Shape ``(n_obs + 1,)``, int64.
    n_obs
        Rows of the matrix.
    stored
        Elements of the shorter of ``data`` and ``indices``.
    where
        Names the matrix in messages.

    Raises
    ------
    StoreFormatError
        Unless ``indptr`` has ``n_obs + 1`` entries, starts at 0, never decreases and
        ends at most at ``stored``: rows would be read from other rows' non-zeros.
    """
    if len(indptr) != n_obs + 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        msg = (
            f"{where}/indptr is not a CSR row index of {n_obs} rows ({len(indptr)} entries, "
            "first 0, non-decreasing)"
        )
        raise StoreFormatError(msg)
    nnz = int(indptr[-1])
    if nnz > stored:
        msg = f"{where}/indptr counts {nnz} non-zeros; data/indices hold {stored}"
        raise StoreFormatError(msg)
    return nnz


def open_matrix(elem: GroupNode | ArrayNode, where: str) -> CSRMatrix | DenseMatrix:
    """Open a matrix element written by anndata.

    Parameters
    ----------
    elem
        The element (e.g. ``root["X"]`` or ``root["layers/counts"]``).
    where
        Names the element in error messages, e.g. ``"store.h5ad: X"``.

    Raises
    ------
    StoreFormatError
        If the element is not CSR or a dense 2-d array (CSC included: annserve reads rows).
    """
    if "encoding-type" not in elem.attrs and not is_array(elem):
        msg = (
            f"{where} is a group without anndata encoding metadata (a pre-0.7 file?); "
            "rewrite it with current anndata (read_h5ad + write_h5ad)"
        )
        raise StoreFormatError(msg)
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding == "csr_matrix" and isinstance(elem, h5py.Group | zarr.Group):
        return CSRMatrix(elem, where)
    if encoding == "array" and isinstance(elem, h5py.Dataset | zarr.Array) and len(elem.shape) == 2:
        return DenseMatrix(elem, where)
    msg = (
        f"{where} has encoding {encoding!r}; annserve serves CSR or dense matrices "
        "(convert CSC to CSR first)"
    )
    raise StoreFormatError(msg)


def _read_narrow(
    reader: RangeReader, runs: list[tuple[int, int]], dtype: np.dtype, empty: Empty
) -> np.ndarray:
    """Read ``runs`` of a 1-d array of ``dtype`` as its cache holds them (uint16 where it can)."""
    if isinstance(reader, CachedRanges):
        return reader.read_narrow(runs, empty)
    return reader.read(runs, empty((sum(b - a for a, b in runs),), dtype))


def _locate(
    reader: RangeReader, dtype: np.dtype, starts: np.ndarray, stops: np.ndarray, narrow: bool
) -> tuple[RowIovecs, np.dtype] | None:
    """Where elements ``[starts[i], stops[i])`` of a 1-d array lie, and their dtype; or None."""
    if isinstance(reader, ChunkFileRanges):
        return reader.mapped().iovecs(starts, stops), dtype
    if isinstance(reader, CachedRanges):
        return reader.iovecs(starts, stops, narrow)
    return None
