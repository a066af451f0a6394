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

    def __init__(self, obs_columns: Sequence[pb.ObsColumn], obs_keys: Sequence[str],
                 n_vars: int, pool: BufferPool | None = None) -> None:
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
        pending: list[Frame] = []
        rows = 0
        for raw in frames:
            frame = decode_frame(raw)
            h = frame.header
            if (h.row_start != rows or h.n_rows <= 0 or h.row_start + h.n_rows > h.batch_rows
                    or (pending and h.batch != pending[0].header.batch)):
                msg = (f"frame out of sequence: batch {h.batch} rows {h.row_start}+{h.n_rows} "
                       f"of {h.batch_rows}, expected row {rows}")
                raise _fail(msg)
            pending.append(frame)
            rows += h.n_rows
            if rows == h.batch_rows:
                yield self._join(pending)
                pending, rows = [], 0
        if pending:
            msg = f"stream ended inside batch {pending[0].header.batch}"
            raise _fail(msg)

    def _join(self, frames: list[Frame]) -> dict[str, object]:
        batch: dict[str, object] = {"X": self._x(frames), "obs": self._obs_frame(frames)}
        if "index" in frames[0].arrays:
            index = self._concat(frames, "index", np.int64)
            if len(index) != frames[0].header.batch_rows:
                msg = f"index has {len(index)} rows, batch has {frames[0].header.batch_rows}"
                raise _fail(msg)
            batch["index"] = index
        return batch

    def _x(self, frames: list[Frame]) -> CSRArrays | np.ndarray:
        n_rows = frames[0].header.batch_rows
        if not frames[0].header.sparse:
            dense = self._concat(frames, "X", np.float32)
            if dense.shape != (n_rows, self._n_vars):
                msg = f"dense X has shape {dense.shape}, expected {(n_rows, self._n_vars)}"
                raise _fail(msg)
            return dense
        lengths = np.concatenate([_row_lengths(f) for f in frames])
        total = int(lengths.sum())
        index_dtype = np.int32 if total < 2**31 else np.int64
        indptr = self._pool.empty((n_rows + 1,), index_dtype)
        indptr[0] = 0
        np.cumsum(lengths, out=indptr[1:])
        for f in frames:
            part = f.arrays.get("indices")
            if part is not None and len(part) and int(part.max()) >= self._n_vars:
                msg = f"column index {int(part.max())} out of range for {self._n_vars} vars"
                raise _fail(msg)
        indices = self._concat(frames, "indices", index_dtype)
        data = self._concat(frames, "data", np.float32)
        if len(indices) != total or len(data) != total:
            msg = (f"CSR arrays disagree: {total} non-zeros by row, {len(indices)} indices, "
                   f"{len(data)} values")
            raise _fail(msg)
        return CSRArrays(data, indices, indptr, (n_rows, self._n_vars))

    def _obs_frame(self, frames: list[Frame]) -> pd.DataFrame:
        columns = {}
        for col in self._obs:
            if col.dtype == "str":
                values = [v for f in frames for s in f.header.string_obs if s.name == col.name
                          for v in s.values]
                columns[col.name] = pd.Series(values, dtype=object)
            elif col.dtype == "category":
                codes = self._concat(frames, f"obs/{col.name}", None)
                columns[col.name] = _categorical(col, codes)
            else:
                columns[col.name] = self._concat(frames, f"obs/{col.name}", np.dtype(col.dtype))
        n_rows = frames[0].header.batch_rows
        df = pd.DataFrame(columns, index=pd.RangeIndex(n_rows))
        if any(len(v) != n_rows for v in columns.values()):
            msg = f"obs columns do not have {n_rows} rows"
            raise _fail(msg)
        return df


    def _concat(self, frames: list[Frame], name: str, dtype: np.dtype | type | None
                ) -> np.ndarray:
        """Concatenate one array of every frame, widening to ``dtype`` in the same copy."""
        parts = []
        for f in frames:
            if name not in f.arrays:
                msg = f"frame of batch {f.header.batch} lacks array {name!r}"
                raise _fail(msg)
            parts.append(f.arrays[name])
            if parts[-1].ndim == 0 or parts[-1].shape[1:] != parts[0].shape[1:]:
                msg = f"array {name!r} changes shape between frames"
                raise _fail(msg)
        out_dtype = np.dtype(dtype) if dtype is not None else parts[0].dtype
        out = self._pool.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), out_dtype)
        start = 0
        for p in parts:
            out[start:start + len(p)] = p
            start += len(p)
        return out


def _categorical(col: pb.ObsColumn, codes: np.ndarray) -> pd.Categorical:
    try:
        return pd.Categorical.from_codes(codes, categories=list(col.categories),
                                         ordered=col.ordered)
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
