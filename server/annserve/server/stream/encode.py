"""Turn rows of a preload buffer into wire arrays (``raw`` or ``compact`` encoding).

Work is split in two: :func:`prepare` converts a whole preload buffer to wire
dtypes once (narrowing is cheaper before the gather than after), and
:func:`frame_arrays` gathers one frame's rows from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from annserve.server.format import NARROW_UINTS, lossless_cast, smallest_uint
from annserve.server.format import cast_into as _cast
from annserve.server.io.matrix import CSRRows, DenseRows, LocatedCSR
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import FrameArray, Iovecs, Pieces

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annserve.server.format import Empty
    from annserve.server.io.mapped import RowIovecs
    from annserve.server.io.obs import ObsColumnData


def compact_values(values: np.ndarray, empty: Empty = np.empty) -> np.ndarray:
    """Narrow values losslessly for the ``compact`` encoding.

    Parameters
    ----------
    values
        Any shape, numeric dtype.
    empty
        Allocates the narrowed array, ``empty(shape, dtype)`` (e.g. a stream's
        :meth:`~annserve.buffers.BufferPool.empty`).

    Returns
    -------
    ``values`` itself when already uint8/uint16 (counts stored narrow, e.g. by
    ``annserve convert``); the smallest unsigned integer dtype (uint8/16/32) when all
    are non-negative integers (counts) up to 2**32 - 1; else ``values`` as stored
    (float64 stays float64): the wire never rounds.
    """
    if values.size == 0:
        return values.astype(np.uint8)
    if values.dtype in NARROW_UINTS[:2]:
        return values
    hi = values.max()  # a negative value fails the lossless cast below: no min needed
    dtype = smallest_uint(int(hi)) if np.isfinite(hi) and hi >= 0 else None
    narrowed = lossless_cast(values, dtype, empty) if dtype is not None else None
    return narrowed if narrowed is not None else values


def select_columns(
    block: CSRRows | DenseRows, columns: np.ndarray, n_vars: int
) -> CSRRows | DenseRows:
    """Keep only some genes of a block, renumbered in the given order.

    Parameters
    ----------
    block
        Rows read from the store.
    columns
        Store positions of the genes to keep, in output order, shape ``(k,)``, int64,
        unique; -1 for a gene the store lacks: an all-zero column (no non-zeros in CSR).
    n_vars
        Genes in the store.

    Returns
    -------
    The block with ``k`` columns; CSR column indices (int64) sorted within each row.
    """
    present = np.flatnonzero(columns >= 0)
    if isinstance(block, DenseRows):
        if len(present) == len(columns):
            return DenseRows(block.values[:, columns])
        values = np.zeros((block.values.shape[0], len(columns)), block.values.dtype)
        values[:, present] = block.values[:, columns[present]]
        return DenseRows(values)
    new_of = np.full(n_vars, -1, dtype=np.int64)
    new_of[columns[present]] = present
    new = new_of[block.indices]
    keep = new >= 0
    n_rows = len(block.indptr) - 1
    row = np.repeat(np.arange(n_rows), np.diff(block.indptr))[keep]
    new = new[keep]
    order = np.lexsort((new, row))
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_rows), out=indptr[1:])
    return CSRRows(indptr, new[order], block.data[keep][order])


@dataclass(frozen=True, slots=True)
class WireCSR:
    """A sparse preload buffer converted to wire dtypes; same row order as the buffer.

    Attributes
    ----------
    indptr
        Row offsets into ``indices``/``values``, shape ``(n_rows + 1,)``, int64.
    indices
        Column of each non-zero, shape ``(nnz,)``, uint16/uint32 (compact) or as stored.
    values
        Each non-zero, shape ``(nnz,)``, in the encoding's dtype.
    """

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    sparse = True

    @property
    def nbytes(self) -> int:
        """Bytes of X held in wire dtypes."""
        return self.values.nbytes + self.indices.nbytes


@dataclass(frozen=True, slots=True)
class WireDense:
    """A dense preload buffer converted to wire dtypes, shape ``(n_rows, n_vars)``."""

    values: np.ndarray
    sparse = False

    @property
    def nbytes(self) -> int:
        """Bytes of X held in wire dtypes."""
        return self.values.nbytes


#: A preload buffer in wire dtypes (rows left in the store's mapped files: ``LocatedCSR``).
WireRows = WireCSR | WireDense | LocatedCSR


def prepare(
    block: CSRRows | DenseRows,
    encoding: int,
    n_vars: int,
    empty: Empty = np.empty,
    value_dtype: np.dtype | None = None,
) -> WireRows:
    """Convert a preload buffer to the wire dtypes of ``encoding``.

    Parameters
    ----------
    block
        Rows read from the store.
    encoding
        ``pb.ENCODING_RAW``, ``pb.ENCODING_COMPACT`` or ``pb.ENCODING_NATIVE``.
    n_vars
        Columns of X; picks uint16 (<= 65,536) or uint32 column indices when compact.
    empty
        Allocates converted arrays, see :func:`compact_values`.
    value_dtype
        dtype of the values with ``pb.ENCODING_NATIVE`` (cast once, for the whole
        buffer, as numpy's ``astype``); None keeps the stored dtype.
    """
    if encoding == pb.ENCODING_NATIVE:
        return _native(block, value_dtype, empty)
    if encoding != pb.ENCODING_COMPACT:
        return raw_rows(block)
    if isinstance(block, DenseRows):
        return WireDense(compact_values(block.values, empty))
    index_dtype = _compact_index_dtype(n_vars)
    indices = block.indices
    if indices.dtype != index_dtype:
        indices = _cast(indices, index_dtype, empty)
    return WireCSR(block.indptr, indices, compact_values(block.data, empty))


def sent_as_stored(
    index_dtype: np.dtype,
    dtype: np.dtype,
    encoding: int,
    n_vars: int,
    value_dtype: np.dtype | None = None,
    *,
    remote: bool = False,
) -> bool:
    """Whether CSR rows of these stored dtypes may be sent as stored, from the store's files.

    Where they may, a shared-memory or bulk stream's rows stay in the store's mapped
    files (:class:`LocatedCSR`) and the kernel gathers them; elsewhere :func:`prepare`
    converts a preload buffer. ``raw`` sends rows as stored; ``native`` when the
    indices are int32 and the values ``value_dtype`` (or it is None); ``compact``
    when the indices already are its uint16/uint32, and on a ``remote`` link (the bulk
    channel) the values its uint8/uint16 too. On the same host it sends any values as
    stored: narrowing integer counts saves bytes, but it would cost the daemon a read
    into a buffer and a pass over it, more than gathering the wider values (annbatch's
    uncompressed collection, float32 counts, shared memory: 181-194k against 125-139k
    cells/s, daemon 4.4 against 7.0-8.0 us/cell, trainer alike). Over a link the bytes
    weigh more: the trainer's receive and the link's bandwidth. Parameters as for
    :func:`prepare`; ``index_dtype`` and ``dtype`` are the stored indices' and values'.
    """
    if encoding == pb.ENCODING_COMPACT:
        narrow = not remote or dtype in (np.uint8, np.uint16)
        return narrow and index_dtype == _compact_index_dtype(n_vars)
    if encoding == pb.ENCODING_NATIVE:
        return index_dtype == np.int32 and (value_dtype is None or dtype == value_dtype)
    return True


def _compact_index_dtype(n_vars: int) -> np.dtype:
    return np.dtype(np.uint16 if n_vars <= 1 << 16 else np.uint32)


def _native(block: CSRRows | DenseRows, value_dtype: np.dtype | None, empty: Empty) -> WireRows:
    """Cast a buffer to what the consumer computes with: int32 indices, ``value_dtype`` values."""

    def cast(values: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
        same = dtype is None or values.dtype == dtype
        return values if same else _cast(values, np.dtype(dtype), empty)

    if isinstance(block, DenseRows):
        return WireDense(cast(block.values, value_dtype))
    wide = len(block.indices) > np.iinfo(np.int32).max
    indices = cast(block.indices, np.dtype(np.int64 if wide else np.int32))
    return WireCSR(block.indptr, indices, cast(block.data, value_dtype))


def raw_rows(block: CSRRows | DenseRows) -> WireRows:
    """Wrap rows as read for the ``raw`` encoding (what obsm arrays travel in)."""
    if isinstance(block, DenseRows):
        return WireDense(block.values)
    return WireCSR(block.indptr, block.indices, block.data)


def frame_arrays(
    rows: WireRows, positions: np.ndarray, encoding: int
) -> list[tuple[str, FrameArray]]:
    """Gather the X arrays of one frame.

    Parameters
    ----------
    rows
        The prepared preload buffer.
    positions
        Positions of the frame's rows in the buffer, shape ``(n,)``, int64, in yield order.
    encoding
        ``pb.ENCODING_RAW`` (``indptr`` int64, ``n + 1`` entries),
        ``pb.ENCODING_COMPACT`` (``row_nnz`` uint16/uint32, ``n`` entries) or
        ``pb.ENCODING_NATIVE`` (``indptr`` in the indices' dtype, ``n + 1`` entries).

    Returns
    -------
    ``[("X", dense)]`` or ``[("indptr" | "row_nnz", ...), ("indices", ...), ("data", ...)]``;
    ``indices`` and ``data`` as :class:`~annserve.wire.Pieces`, one slice of the
    buffer per row, gathered when the frame is written (:func:`annserve.wire.encode_frame`,
    or :func:`annserve.server.rpc.gather.pwrite_parts` into shared memory); rows left
    in the store's files (:class:`~annserve.server.io.matrix.LocatedCSR`) as
    :class:`~annserve.wire.Iovecs`, which only ``pwrite_parts`` gathers.
    """
    if isinstance(rows, WireDense):
        return [("X", rows.values[positions])]
    if isinstance(rows, LocatedCSR):
        lengths = rows.lengths[positions]
        nnz = int(lengths.sum())
        return [
            _row_part(lengths, encoding, rows.index_dtype),
            ("indices", _iovecs(rows.indices, positions, rows.index_dtype, nnz)),
            ("data", _iovecs(rows.data, positions, rows.dtype, nnz)),
        ]
    starts = rows.indptr[positions]
    lengths = rows.indptr[positions + 1] - starts
    row_part = _row_part(lengths, encoding, rows.indices.dtype)
    # each row is a contiguous run: copying slices (once, into the frame) is several
    # times faster than a fancy-index gather through a per-non-zero index array
    # (measured ~6x: np.repeat + np.take, 13-17 us/cell against 2.4 for slices + pwritev)
    stops = starts + lengths
    nnz = int(lengths.sum())
    return [
        row_part,
        ("indices", _pieces(rows.indices, starts, stops, nnz)),
        ("data", _pieces(rows.values, starts, stops, nnz)),
    ]


def _row_part(lengths: np.ndarray, encoding: int, index_dtype: np.dtype) -> tuple[str, np.ndarray]:
    """Return a frame's row lengths as its encoding sends them (``row_nnz`` or ``indptr``)."""
    if encoding == pb.ENCODING_COMPACT:
        max_len = int(lengths.max()) if len(lengths) else 0
        return ("row_nnz", lengths.astype(smallest_uint(max_len) or np.uint64))
    indptr = np.r_[np.int64(0), np.cumsum(lengths)]
    return ("indptr", indptr.astype(index_dtype) if encoding == pb.ENCODING_NATIVE else indptr)


def _iovecs(rows: RowIovecs, positions: np.ndarray, dtype: np.dtype, length: int) -> Iovecs:
    """Send the mapped ranges of rows ``positions``, gathered by the kernel when written."""
    return Iovecs(rows.take(positions), dtype, length, rows.owners)


def _pieces(values: np.ndarray, starts: np.ndarray, stops: np.ndarray, length: int) -> Pieces:
    """Send ``values[a:b]`` for each ``(a, b)``, cut when the frame is written."""
    values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return Pieces(values, starts, stops, length)


def obs_arrays(
    columns: Sequence[ObsColumnData], global_rows: np.ndarray
) -> tuple[list[tuple[str, np.ndarray]], list[pb.StringColumn]]:
    """Slice the requested obs columns at the frame's rows.

    Parameters
    ----------
    columns
        Requested columns.
    global_rows
        Store row indices of the frame, shape ``(n,)``, int64.

    Returns
    -------
    ``("obs/<name>", values)`` arrays for categorical (codes) and numeric columns,
    ``("obs/<name>/missing", mask)`` for nullable columns, and text columns as protobuf
    messages.
    """
    arrays, strings = [], []
    for col in columns:
        values = col.values[global_rows]
        if col.kind == "str":
            strings.append(pb.StringColumn(name=col.name, values=values.tolist()))
        else:
            arrays.append((f"obs/{col.name}", values))
        if col.missing is not None:
            arrays.append((f"obs/{col.name}/missing", col.missing[global_rows]))
    return arrays, strings
