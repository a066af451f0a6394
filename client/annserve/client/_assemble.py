"""Reassemble decoded frames into minibatches of numpy arrays (no torch, no scipy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from annserve.buffers import BufferPool
from annserve.errors import FrameDecodeError
from annserve.wire import Frame, decode_frame

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from annserve.v1 import annserve_pb2 as pb


@dataclass(frozen=True, slots=True)
class CSRArrays:
    """A CSR matrix as plain numpy arrays (``scipy.sparse.csr_matrix((data, indices, indptr))``).

    Attributes
    ----------
    data
        Non-zero values, shape ``(nnz,)``, float32.
    indices
        Column (gene) of each non-zero, shape ``(nnz,)``, int32 (int64 when nnz >= 2**31).
    indptr
        Row offsets, shape ``(n_rows + 1,)``, same dtype as ``indices``.
    shape
        ``(n_rows, n_vars)``.
    """

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    shape: tuple[int, int]


def _fail(message: str) -> FrameDecodeError:
    return FrameDecodeError(message)


class BatchAssembler:
    """Turn a stream of serialized frames into minibatches.

    Each frame is copied into its batch's arrays as it arrives and then dropped, so a
    batch being assembled costs its own arrays and one frame, not all its frames too.

    Parameters
    ----------
    obs_columns
        The store's obs column descriptions (from ``DescribeStore``).
    obs_keys
        Columns requested with each batch.
    n_vars
        Genes in the store; every column index must be below it.
    pool
        Where large output arrays come from; a private pool by default.
    """

    def __init__(
        self,
        obs_columns: Sequence[pb.ObsColumn],
        obs_keys: Sequence[str],
        n_vars: int,
        pool: BufferPool | None = None,
    ) -> None:
        by_name = {c.name: c for c in obs_columns}
        self._obs = [by_name[k] for k in obs_keys]
        self._n_vars = n_vars
        self._pool = pool if pool is not None else BufferPool()

    def batches(self, frames: Iterator[bytes]) -> Iterator[dict[str, object]]:
        """Yield ``{"X", "obs", "index"?}`` batches as numpy/pandas objects.

        Raises
        ------
        FrameDecodeError
            If a frame is malformed or out of sequence, or the stream ends mid-batch.
        """
        batch: _Batch | None = None
        for raw in frames:
            frame = decode_frame(raw)
            if batch is None:
                h = frame.header
                batch = _Batch(h.batch, h.batch_rows, self._n_vars, self._obs, self._pool)
            batch.add(frame)
            del raw, frame  # the frame's bytes are copied: free them before the next arrives
            if batch.complete:
                yield batch.result()
                batch = None
        if batch is not None:
            msg = f"stream ended inside batch {batch.number}"
            raise _fail(msg)


class _Batch:
    """One minibatch being filled frame by frame."""

    def __init__(
        self, number: int, n_rows: int, n_vars: int, obs: Sequence[pb.ObsColumn], pool: BufferPool
    ) -> None:
        self.number, self._n_rows, self._n_vars = number, n_rows, n_vars
        self._obs = obs
        self._pool = pool
        self._rows = 0
        self._sparse: bool | None = None
        self._dense: np.ndarray | None = None
        self._lengths: list[np.ndarray] = []
        self._indices: _Growing | None = None
        self._data: _Growing | None = None
        self._parts: dict[str, list[np.ndarray]] = {}
        self._strings: dict[str, list[str]] = {c.name: [] for c in obs if c.dtype == "str"}

    @property
    def complete(self) -> bool:
        return self._rows == self._n_rows

    def add(self, frame: Frame) -> None:
        """Copy one frame's rows into the batch."""
        h = frame.header
        if (
            h.batch != self.number
            or h.batch_rows != self._n_rows
            or h.row_start != self._rows
            or h.n_rows <= 0
            or h.row_start + h.n_rows > h.batch_rows
            or (self._sparse is not None and h.sparse != self._sparse)
        ):
            msg = (
                f"frame out of sequence: batch {h.batch} rows {h.row_start}+{h.n_rows} "
                f"of {h.batch_rows}, expected batch {self.number} row {self._rows}"
            )
            raise _fail(msg)
        self._sparse = h.sparse
        if h.sparse:
            self._add_csr(frame)
        else:
            self._add_dense(frame)
        self._add_obs(frame)
        self._rows += h.n_rows

    def _add_dense(self, frame: Frame) -> None:
        part = _array(frame, "X")
        if part.shape != (frame.header.n_rows, self._n_vars):
            expected = (frame.header.n_rows, self._n_vars)
            msg = f"dense X frame has shape {part.shape}, expected {expected}"
            raise _fail(msg)
        if self._dense is None:
            self._dense = self._pool.empty((self._n_rows, self._n_vars), np.float32)
        self._dense[self._rows : self._rows + len(part)] = part

    def _add_csr(self, frame: Frame) -> None:
        lengths = _row_lengths(frame)
        indices, data = _array(frame, "indices"), _array(frame, "data")
        nnz = int(lengths.sum())
        if len(indices) != nnz or len(data) != nnz:
            msg = (
                f"CSR arrays disagree: {nnz} non-zeros by row, {len(indices)} indices, "
                f"{len(data)} values"
            )
            raise _fail(msg)
        if nnz and int(indices.max()) >= self._n_vars:
            msg = f"column index {int(indices.max())} out of range for {self._n_vars} vars"
            raise _fail(msg)
        if self._indices is None or self._data is None:  # room for the batch at this density
            estimate = int(nnz * self._n_rows / frame.header.n_rows * _ESTIMATE_MARGIN) + 1
            self._indices = _Growing(self._pool, np.int32, estimate)
            self._data = _Growing(self._pool, np.float32, estimate)
        self._lengths.append(lengths)
        self._indices.append(indices)
        self._data.append(data)

    def _add_obs(self, frame: Frame) -> None:
        names = [f"obs/{c.name}" for c in self._obs if c.dtype != "str"]
        if "index" in frame.arrays:
            names.append("index")
        for name in names:
            part = _array(frame, name)
            if len(part) != frame.header.n_rows:
                msg = f"array {name!r} has {len(part)} rows, frame has {frame.header.n_rows}"
                raise _fail(msg)
            self._parts.setdefault(name, []).append(part.copy())  # a view would keep the frame
        for s in frame.header.string_obs:
            if s.name in self._strings:
                self._strings[s.name].extend(s.values)

    def result(self) -> dict[str, object]:
        """Return the finished batch ``{"X", "obs", "index"?}``."""
        batch: dict[str, object] = {"X": self._x(), "obs": self._obs_frame()}
        if "index" in self._parts:
            index = np.concatenate(self._parts["index"]).astype(np.int64, copy=False)
            if len(index) != self._n_rows:
                msg = f"index has {len(index)} rows, batch has {self._n_rows}"
                raise _fail(msg)
            batch["index"] = index
        return batch

    def _x(self) -> CSRArrays | np.ndarray:
        # a batch exists once a frame arrived, so one of the two layouts was started
        if self._indices is not None and self._data is not None:
            indices, data = self._indices.result(), self._data.result()
            indptr = self._pool.empty((self._n_rows + 1,), indices.dtype)
            indptr[0] = 0
            np.cumsum(np.concatenate(self._lengths), out=indptr[1:])
            return CSRArrays(data, indices, indptr, (self._n_rows, self._n_vars))
        if self._dense is None:
            msg = f"batch {self.number} has no X"
            raise _fail(msg)
        return self._dense

    def _obs_frame(self) -> pd.DataFrame:
        columns: dict[str, pd.Series | pd.Categorical[str] | np.ndarray] = {}
        for col in self._obs:
            if col.dtype == "str":
                columns[col.name] = pd.Series(self._strings[col.name], dtype=object)
                continue
            values = np.concatenate(self._parts[f"obs/{col.name}"])
            if col.dtype == "category":
                columns[col.name] = _categorical(col, values)
            else:
                columns[col.name] = values.astype(np.dtype(col.dtype), copy=False)
        if any(len(v) != self._n_rows for v in columns.values()):
            msg = f"obs columns do not have {self._n_rows} rows"
            raise _fail(msg)
        return pd.DataFrame(columns, index=pd.RangeIndex(self._n_rows))


#: Room reserved for a batch's non-zeros beyond the estimate from its first frame.
_ESTIMATE_MARGIN = 1.1


class _Growing:
    """A 1-d array filled part by part from a pool; moved to a larger one when full.

    Values are widened to its dtype in the same copy; int32 becomes int64 once the
    array would pass 2**31 - 1 elements (CSR indices of a huge batch).
    """

    def __init__(self, pool: BufferPool, dtype: type, capacity: int) -> None:
        self._pool = pool
        self._out = pool.empty((capacity,), dtype)
        self._n = 0

    def append(self, part: np.ndarray) -> None:
        end = self._n + len(part)
        if end > len(self._out):
            dtype = self._out.dtype
            if dtype == np.int32 and end > np.iinfo(np.int32).max:
                dtype = np.dtype(np.int64)
            larger = self._pool.empty((max(end, 2 * len(self._out)),), dtype)
            larger[: self._n] = self._out[: self._n]
            self._out = larger
        self._out[self._n : end] = part
        self._n = end

    def result(self) -> np.ndarray:
        return self._out[: self._n]


def _array(frame: Frame, name: str) -> np.ndarray:
    part = frame.arrays.get(name)
    if part is None:
        msg = f"frame of batch {frame.header.batch} lacks array {name!r}"
        raise _fail(msg)
    if part.ndim == 0:
        msg = f"array {name!r} of batch {frame.header.batch} is a scalar"
        raise _fail(msg)
    return part


def _categorical(col: pb.ObsColumn, codes: np.ndarray) -> pd.Categorical[str]:
    try:
        return pd.Categorical.from_codes(
            codes, categories=pd.Index(list(col.categories)), ordered=col.ordered
        )
    except ValueError as e:
        msg = f"obs column {col.name!r}: bad category codes: {e}"
        raise _fail(msg) from e


def _row_lengths(frame: Frame) -> np.ndarray:
    n = frame.header.n_rows
    if "row_nnz" in frame.arrays:
        lengths = frame.arrays["row_nnz"].astype(np.int64)
    elif "indptr" in frame.arrays:
        indptr = frame.arrays["indptr"].astype(np.int64)
        lengths = np.diff(indptr)
        if len(indptr) and indptr[0] != 0:
            msg = "indptr does not start at 0"
            raise _fail(msg)
    else:
        msg = "sparse frame has neither row_nnz nor indptr"
        raise _fail(msg)
    if len(lengths) != n or (len(lengths) and lengths.min() < 0):
        msg = f"row lengths do not describe {n} rows"
        raise _fail(msg)
    return lengths
