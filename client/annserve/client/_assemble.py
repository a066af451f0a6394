"""Reassemble decoded frames into minibatches of numpy arrays (no torch, no scipy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
        Non-zero values, shape ``(nnz,)``, the loader's ``dtype`` (float32 by default).
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


_FLOAT32 = np.dtype(np.float32)


class XStage(Protocol):
    """Takes X's arrays of sparse frames instead of the CPU widening (device assembly)."""

    def take(self, frame: Frame) -> bool:
        """Keep this frame's X (False: the frame's X is assembled on the CPU)."""
        ...

    def result(self) -> object:
        """Return what stands for X of the batch whose last frame was just taken."""
        ...


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
    dtype
        dtype of X's values in the batches (frames may carry narrower ones).
    obsm
        The requested obsm arrays (from ``DescribeStore``), each with the dtype its
        values take in the batches.
    index_name
        Name of the obs frames' index (``StoreInfo.obs_index_name``).
    x_stage
        Where sparse X goes instead of the CPU widening (``annserve.client._device``);
        the batch's ``"X"`` is then what ``x_stage.result()`` returns.
    """

    def __init__(
        self,
        obs_columns: Sequence[pb.ObsColumn],
        obs_keys: Sequence[str],
        n_vars: int,
        pool: BufferPool | None = None,
        *,
        dtype: np.dtype = _FLOAT32,
        obsm: Sequence[tuple[pb.ObsmInfo, np.dtype]] = (),
        index_name: str | None = None,
        x_stage: XStage | None = None,
    ) -> None:
        by_name = {c.name: c for c in obs_columns}
        self._spec = _Spec(
            index_name,
            tuple(by_name[k] for k in obs_keys),
            n_vars,
            np.dtype(dtype),
            tuple(obsm),
            x_stage,
        )
        self._pool = pool if pool is not None else BufferPool()

    def batches(
        self, frames: Iterator[bytes | bytearray | memoryview]
    ) -> Iterator[dict[str, object]]:
        """Yield ``{"X", "obs", "obsm"?, "index"?}`` batches as numpy/pandas objects.

        ``obs`` is indexed by the rows' obs_names; ``obsm`` (when obsm arrays were
        requested) maps each name to its rows, dense ``(n_rows, n_cols)`` or
        :class:`CSRArrays`. A batch carried by one writable frame already in the
        batch's dtypes (a shared-memory frame, ``ENCODING_NATIVE``) views X in place;
        other frames are copied into pooled arrays and dropped.

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
                batch = _Batch(h.batch, h.batch_rows, self._spec, self._pool)
            batch.add(frame)
            # the frame is copied, or viewed by the batch: drop it before the next arrives
            del raw, frame
            if batch.complete:
                yield batch.result()
                batch = None
        if batch is not None:
            msg = f"stream ended inside batch {batch.number}"
            raise _fail(msg)


@dataclass(frozen=True, slots=True)
class _Spec:
    """What every batch of a stream holds: obs columns, genes, dtypes, obsm arrays."""

    index_name: str | None
    obs: tuple[pb.ObsColumn, ...]
    n_vars: int
    dtype: np.dtype
    obsm: tuple[tuple[pb.ObsmInfo, np.dtype], ...]
    x_stage: XStage | None = None


class _Batch:
    """One minibatch being filled frame by frame."""

    def __init__(self, number: int, n_rows: int, spec: _Spec, pool: BufferPool) -> None:
        self.number, self._n_rows, self._spec = number, n_rows, spec
        self._pool = pool
        self._rows = 0
        self._sparse: bool | None = None
        self._dense: np.ndarray | None = None
        self._csr: _CSRBuilder | None = None
        self._whole: CSRArrays | None = None  # X of a one-frame batch, viewed in place
        self._staged = False  # X went to spec.x_stage
        self._obsm_csr = {
            info.name: _CSRBuilder(pool, dtype, n_rows, info.n_cols, f"obsm/{info.name}/")
            for info, dtype in spec.obsm
            if info.sparse
        }
        self._parts: dict[str, list[np.ndarray]] = {}
        self._strings: dict[str, list[str]] = {
            c.name: [] for c in spec.obs if c.dtype in _TEXT_DTYPES
        }
        self._names: list[str] = []

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
        stage = self._spec.x_stage
        staged = h.sparse and stage is not None and stage.take(frame)
        whole = _in_place(frame, self._spec) if h.n_rows == self._n_rows and not staged else None
        if staged:
            self._staged = True
        elif isinstance(whole, CSRArrays):
            self._whole = whole
        elif whole is not None:
            self._dense = whole
        elif h.sparse:
            if self._csr is None:
                self._csr = _CSRBuilder(
                    self._pool, self._spec.dtype, self._n_rows, self._spec.n_vars
                )
            self._csr.add(frame)
        else:
            self._add_dense(frame)
        for builder in self._obsm_csr.values():
            builder.add(frame)
        self._add_columns(frame)
        self._rows += h.n_rows

    def _add_dense(self, frame: Frame) -> None:
        part = _array(frame, "X")
        n_vars = self._spec.n_vars
        if part.shape != (frame.header.n_rows, n_vars):
            expected = (frame.header.n_rows, n_vars)
            msg = f"dense X frame has shape {part.shape}, expected {expected}"
            raise _fail(msg)
        if self._dense is None:
            self._dense = self._pool.empty((self._n_rows, n_vars), self._spec.dtype)
        self._dense[self._rows : self._rows + len(part)] = part

    def _add_columns(self, frame: Frame) -> None:
        """Keep the frame's per-row arrays: obs values and masks, dense obsm, index."""
        n = frame.header.n_rows
        names = [f"obs/{c.name}" for c in self._spec.obs if c.dtype not in _TEXT_DTYPES]
        names += [f"obs/{c.name}/missing" for c in self._spec.obs if c.nullable]
        names += [f"obsm/{info.name}" for info, _ in self._spec.obsm if not info.sparse]
        if "index" in frame.arrays:
            names.append("index")
        for name in names:
            part = _array(frame, name)
            if len(part) != n:
                msg = f"array {name!r} has {len(part)} rows, frame has {n}"
                raise _fail(msg)
            self._parts.setdefault(name, []).append(part.copy())  # a view would keep the frame
        for s in frame.header.string_obs:
            if s.name in self._strings:
                self._strings[s.name].extend(s.values)
        if len(frame.header.obs_names) != n:
            msg = f"frame has {len(frame.header.obs_names)} obs_names for {n} rows"
            raise _fail(msg)
        self._names.extend(frame.header.obs_names)

    def result(self) -> dict[str, object]:
        """Return the finished batch ``{"X", "obs", "obsm"?, "index"?}``."""
        batch: dict[str, object] = {"X": self._x(), "obs": self._obs_frame()}
        if self._spec.obsm:
            batch["obsm"] = {info.name: self._obsm(info, dtype) for info, dtype in self._spec.obsm}
        if "index" in self._parts:
            batch["index"] = self._joined("index").astype(np.int64, copy=False)
        return batch

    def _joined(self, name: str) -> np.ndarray:
        values = np.concatenate(self._parts[name])
        if len(values) != self._n_rows:
            msg = f"{name} has {len(values)} rows, batch has {self._n_rows}"
            raise _fail(msg)
        return values

    def _x(self) -> object:
        # a batch exists once a frame arrived, so one of the two layouts was started
        if self._staged and self._spec.x_stage is not None:
            return self._spec.x_stage.result()
        if self._whole is not None:
            return self._whole
        if self._csr is not None:
            return self._csr.result()
        if self._dense is None:
            msg = f"batch {self.number} has no X"
            raise _fail(msg)
        return self._dense

    def _obsm(self, info: pb.ObsmInfo, dtype: np.dtype) -> CSRArrays | np.ndarray:
        if info.sparse:
            return self._obsm_csr[info.name].result()
        values = self._joined(f"obsm/{info.name}")
        if values.shape[1:] != (info.n_cols,):
            msg = f"obsm/{info.name} has shape {values.shape}, expected {info.n_cols} columns"
            raise _fail(msg)
        return values.astype(dtype, copy=False)

    def _obs_frame(self) -> pd.DataFrame:
        columns = {col.name: self._obs_column(col) for col in self._spec.obs}
        if any(len(v) != self._n_rows for v in columns.values()):
            msg = f"obs columns do not have {self._n_rows} rows"
            raise _fail(msg)
        if len(self._names) != self._n_rows:
            msg = f"batch has {len(self._names)} obs_names for {self._n_rows} rows"
            raise _fail(msg)
        index = pd.Index(self._names, dtype=object, name=self._spec.index_name)
        return pd.DataFrame(columns, index=index, columns=pd.Index(list(columns), dtype=object))

    def _obs_column(self, col: pb.ObsColumn) -> np.ndarray | pd.api.extensions.ExtensionArray:
        """One obs column in the pandas dtype the store has (see ``pb.ObsColumn``)."""
        text = col.dtype in _TEXT_DTYPES
        if text:
            values = np.array(self._strings[col.name], dtype=object)
        else:
            values = self._joined(f"obs/{col.name}")
        try:
            if col.dtype == "category":
                return _categorical(col, values)
            if not col.nullable:
                return values if text else values.astype(np.dtype(col.dtype), copy=False)
            missing = self._joined(f"obs/{col.name}/missing").astype(bool)
            if col.dtype == "str":
                values[missing] = None
                return values
            out = pd.array(values, dtype=col.dtype)  # type: ignore[call-overload]  # a pandas nullable name: "Int64", "boolean", "string"...
            out[missing] = pd.NA
        except (TypeError, ValueError) as e:
            msg = f"obs column {col.name!r} of dtype {col.dtype!r}: {e}"
            raise _fail(msg) from e
        return out


#: ``ObsColumn.dtype`` of columns that travel as text (``StringColumn``).
_TEXT_DTYPES = frozenset({"str", "string"})
#: Room reserved for a batch's non-zeros beyond the estimate from its first frame.
_ESTIMATE_MARGIN = 1.1


class _CSRBuilder:
    """The CSR rows of one matrix of a batch (X, or a sparse obsm array), frame by frame.

    Reads the frame arrays ``<prefix>row_nnz`` (or ``<prefix>indptr``),
    ``<prefix>indices`` and ``<prefix>data``, widening values to ``dtype``.
    """

    def __init__(
        self, pool: BufferPool, dtype: np.dtype, n_rows: int, n_cols: int, prefix: str = ""
    ) -> None:
        self._pool, self._dtype = pool, dtype
        self._n_rows, self._n_cols, self._prefix = n_rows, n_cols, prefix
        self._lengths: list[np.ndarray] = []
        self._indices: _Growing | None = None
        self._data: _Growing | None = None

    def add(self, frame: Frame) -> None:
        lengths = _row_lengths(frame, self._prefix)
        indices = _array(frame, f"{self._prefix}indices")
        data = _array(frame, f"{self._prefix}data")
        nnz = check_csr(lengths, indices, data, self._n_cols, self._prefix or "X")
        if self._indices is None or self._data is None:  # room for the batch at this density
            estimate = int(nnz * self._n_rows / frame.header.n_rows * _ESTIMATE_MARGIN) + 1
            self._indices = _Growing(self._pool, np.dtype(np.int32), estimate)
            self._data = _Growing(self._pool, self._dtype, estimate)
        self._lengths.append(lengths)
        self._indices.append(indices)
        self._data.append(data)

    def result(self) -> CSRArrays:
        if self._indices is None or self._data is None:
            msg = f"batch has no {self._prefix or 'X'} rows"
            raise _fail(msg)
        indices, data = self._indices.result(), self._data.result()
        indptr = self._pool.empty((self._n_rows + 1,), indices.dtype)
        indptr[0] = 0
        np.cumsum(np.concatenate(self._lengths), out=indptr[1:])
        return CSRArrays(data, indices, indptr, (self._n_rows, self._n_cols))


class _Growing:
    """A 1-d array filled part by part from a pool; moved to a larger one when full.

    Values are widened to its dtype in the same copy; int32 becomes int64 once the
    array would pass 2**31 - 1 elements (CSR indices of a huge batch).
    """

    def __init__(self, pool: BufferPool, dtype: np.dtype, capacity: int) -> None:
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


def check_csr(
    lengths: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int, name: str = "X"
) -> int:
    """Check one frame's CSR arrays against each other and the column count.

    Parameters
    ----------
    lengths
        Non-zeros of each row, shape ``(n_rows,)``, integer.
    indices, data
        Column and value of each non-zero, shape ``(nnz,)`` each.
    n_cols
        Columns of the matrix; every index must be below it.
    name
        Names the matrix in messages (``"X"``, ``"obsm/<key>/"``).

    Returns
    -------
    The frame's non-zeros.

    Raises
    ------
    FrameDecodeError
        If the row lengths, indices and values disagree, or an index is out of range.
    """
    nnz = int(lengths.sum(dtype=np.int64))
    if len(indices) != nnz or len(data) != nnz:
        msg = (
            f"CSR arrays {name!r} disagree: {nnz} non-zeros by row, "
            f"{len(indices)} indices, {len(data)} values"
        )
        raise _fail(msg)
    if nnz and int(indices.max()) >= n_cols:
        msg = f"column index {int(indices.max())} out of range for {n_cols} columns"
        raise _fail(msg)
    return nnz


def _in_place(frame: Frame, spec: _Spec) -> CSRArrays | np.ndarray | None:
    """Return a whole-batch frame's X as it lies in the frame, if it needs no conversion.

    That is when the frame (e.g. in shared memory, ``ENCODING_NATIVE``) is writable and
    already holds X in the batch's dtypes: dense ``X``, or CSR with ``indptr`` in the
    indices' dtype (int32 or int64), checked like copied frames (bounds, row offsets).
    """
    h, arrays = frame.header, frame.arrays
    if not h.sparse:
        x = arrays.get("X")
        ok = x is not None and x.dtype == spec.dtype and x.shape == (h.n_rows, spec.n_vars)
        return x if ok and x is not None and x.flags.writeable else None
    indptr, indices, data = (arrays.get(k) for k in ("indptr", "indices", "data"))
    if (
        indptr is None
        or indices is None
        or data is None
        or data.dtype != spec.dtype
        or indices.dtype not in _INDEX_DTYPES
        or indptr.dtype != indices.dtype
        or not (indptr.flags.writeable and indices.flags.writeable and data.flags.writeable)
    ):
        return None
    nnz = len(indices)
    if (
        indptr.shape != (h.n_rows + 1,)
        or len(data) != nnz
        or indptr[0] != 0
        or indptr[-1] != nnz
        or (h.n_rows and np.diff(indptr).min() < 0)
    ):
        msg = f"CSR arrays of batch {h.batch} disagree: indptr does not describe {nnz} non-zeros"
        raise _fail(msg)
    if nnz and int(indices.max()) >= spec.n_vars:
        msg = f"column index {int(indices.max())} out of range for {spec.n_vars} columns"
        raise _fail(msg)
    return CSRArrays(data, indices, indptr, (h.n_rows, spec.n_vars))


#: Index dtypes scipy and torch CSR take as they are.
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _array(frame: Frame, name: str) -> np.ndarray:
    part = frame.arrays.get(name)
    if part is None:
        msg = f"frame of batch {frame.header.batch} lacks array {name!r}"
        raise _fail(msg)
    if part.ndim == 0:
        msg = f"array {name!r} of batch {frame.header.batch} is a scalar"
        raise _fail(msg)
    return part


def _categorical(col: pb.ObsColumn, codes: np.ndarray) -> pd.Categorical:
    """Rebuild a categorical from its codes, its categories parsed to their dtype."""
    texts = list(col.categories)
    kind = col.categories_dtype
    categories: pd.Index
    if kind == "bool":
        categories = pd.Index([t == "True" for t in texts], dtype=bool)
    elif kind in ("", "str"):
        categories = pd.Index(texts)
    else:
        categories = pd.Index(texts).astype(np.dtype(kind))
    return pd.Categorical.from_codes(codes, categories=categories, ordered=col.ordered)


def _row_lengths(frame: Frame, prefix: str = "") -> np.ndarray:
    n = frame.header.n_rows
    if f"{prefix}row_nnz" in frame.arrays:
        lengths = frame.arrays[f"{prefix}row_nnz"].astype(np.int64)
    elif f"{prefix}indptr" in frame.arrays:
        indptr = frame.arrays[f"{prefix}indptr"].astype(np.int64)
        lengths = np.diff(indptr)
        if len(indptr) and indptr[0] != 0:
            msg = f"{prefix}indptr does not start at 0"
            raise _fail(msg)
    else:
        msg = f"sparse frame has neither {prefix}row_nnz nor {prefix}indptr"
        raise _fail(msg)
    if len(lengths) != n or (len(lengths) and lengths.min() < 0):
        msg = f"{prefix or 'X '}row lengths do not describe {n} rows"
        raise _fail(msg)
    return lengths
