"""Matrices of an input of ``annserve convert``, read by row range.

X and layers are read by :class:`CSRSource` (the CSR arrays sliced directly, which also
plans the row blocks) or :class:`DenseSource`; ``raw/X`` and CSR ``obsm`` elements,
in any layout anndata reads (including the ``h5sparse_format`` groups of anndata < 0.7),
through anndata's :func:`anndata.io.sparse_dataset` by :class:`SparseRows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp
import zarr

from annserve.errors import StoreFormatError
from annserve.server.io.elements import array_at, attr_ints, element_at

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from annserve.server.io.elements import ArrayNode, GroupNode

#: Rows of ``indptr`` read at once when planning row blocks.
_INDPTR_WINDOW = 1 << 16


@dataclass(frozen=True, slots=True)
class MatrixInfo:
    """One matrix of an input, shape ``(n_obs, n_columns)``.

    Attributes
    ----------
    key
        ``"X"``, ``"layers/<name>"``, ``"raw/X"`` or ``"obsm/<name>"``.
    sparse
        True for CSR, False for dense.
    dtype
        dtype of the values.
    nnz
        Stored values: non-zeros for CSR, ``n_obs * n_vars`` for dense.
    """

    key: str
    sparse: bool
    dtype: np.dtype
    nnz: int


class CSRSource:
    """Row-range reads of one CSR group of an input, as CSR parts."""

    sparse = True

    def __init__(self, key: str, group: GroupNode, path: Path) -> None:
        where = f"{path}: {key}"
        self.shape = attr_ints(group.attrs, "shape", where)
        self._indptr = array_at(group, "indptr", where)
        self._indices = array_at(group, "indices", where)
        self._data = array_at(group, "data", where)
        _check_csr(path, key, self.shape, self._indptr, self._indices, self._data)
        nnz = int(np.asarray(self._indptr[self.shape[0]]))
        self.info = MatrixInfo(key, True, _numeric(np.dtype(self._data.dtype), key, path), nnz)

    def blocks(
        self, value_bytes: int, row_bytes: int, block_bytes: int
    ) -> Iterator[tuple[int, int]]:
        """Cut the rows into ``[start, stop)`` blocks of at most ``block_bytes`` (one row at least).

        A block costs ``value_bytes`` per stored value (non-zero) plus ``row_bytes`` per
        row, bytes.
        """
        n_obs = self.shape[0]
        start = 0
        while start < n_obs:
            window = np.asarray(
                self._indptr[start : min(start + _INDPTR_WINDOW, n_obs) + 1], dtype=np.int64
            )
            cost = (window - window[0]) * value_bytes + np.arange(len(window)) * row_bytes
            stop = start + max(1, int(np.searchsorted(cost, block_bytes, side="right")) - 1)
            yield start, stop
            start = stop

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read rows ``[start, stop)`` as CSR parts.

        Returns
        -------
        ``row_nnz`` (shape ``(stop - start,)``, int64), ``indices`` and ``data`` (shape
        ``(nnz,)``, the stored dtypes).
        """
        indptr = np.asarray(self._indptr[start : stop + 1], dtype=np.int64)
        a, b = int(indptr[0]), int(indptr[-1])
        return np.diff(indptr), np.asarray(self._indices[a:b]), np.asarray(self._data[a:b])


class DenseSource:
    """Row-range reads of one dense 2-d array of an input, as CSR parts (zeros dropped)."""

    sparse = False

    def __init__(self, key: str, array: ArrayNode, path: Path) -> None:
        self.shape = tuple(int(s) for s in array.shape)
        self._dense = array
        nnz = self.shape[0] * self.shape[1]
        self.info = MatrixInfo(key, False, _numeric(np.dtype(array.dtype), key, path), nnz)

    def blocks(
        self, value_bytes: int, row_bytes: int, block_bytes: int
    ) -> Iterator[tuple[int, int]]:
        """Cut the rows into blocks as :meth:`CSRSource.blocks` (every value is stored)."""
        n_obs = self.shape[0]
        step = max(1, block_bytes // (self.shape[1] * value_bytes + row_bytes))
        for start in range(0, n_obs, step):
            yield start, min(start + step, n_obs)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read rows ``[start, stop)`` as CSR parts; see :meth:`CSRSource.read`."""
        dense = np.asarray(self._dense[start:stop])
        rows, cols = np.nonzero(dense)
        row_nnz = np.bincount(rows, minlength=stop - start).astype(np.int64)
        return row_nnz, cols, dense[rows, cols]


class SparseRows:
    """Row-range reads of a CSR matrix as CSR parts, through its ``[start:stop]`` slicing.

    ``matrix`` is an anndata sparse dataset (:func:`anndata.io.sparse_dataset`) or an
    in-memory scipy CSR matrix (the obsm of a legacy file read by anndata).
    """

    sparse = True

    def __init__(self, key: str, matrix: ad.abc.CSRDataset | sp.csr_matrix, path: Path) -> None:
        self.shape = tuple(int(s) for s in matrix.shape)
        self._matrix = matrix
        nnz = (
            int(matrix.group["indptr"][-1]) if isinstance(matrix, ad.abc.CSRDataset) else matrix.nnz
        )
        self.info = MatrixInfo(key, True, _numeric(np.dtype(matrix.dtype), key, path), nnz)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read rows ``[start, stop)`` as CSR parts; see :meth:`CSRSource.read`."""
        part = sp.csr_matrix(self._matrix[start:stop])
        return np.diff(part.indptr).astype(np.int64), part.indices, part.data


#: One matrix of an input, read by row ranges.
Matrix: TypeAlias = CSRSource | DenseSource | SparseRows


def _numeric(dtype: np.dtype, key: str, path: Path) -> np.dtype:
    if dtype.kind not in "biuf":
        msg = f"{path}: {key} has non-numeric dtype {dtype}"
        raise StoreFormatError(msg)
    return dtype


def open_matrix(root: GroupNode, key: str, path: Path) -> CSRSource | DenseSource:
    """Open ``X`` or ``layers/<name>`` of an input.

    Raises
    ------
    StoreFormatError
        If it is missing, neither CSR nor a dense 2-d array, malformed or non-numeric.
    """
    if key not in root:
        what = "X" if key == "X" else f"layer {key.split('/', 1)[1]!r}"
        msg = f"{path}: has no {what}"
        raise StoreFormatError(msg)
    elem = element_at(root, key, str(path))
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding == "csr_matrix" and isinstance(elem, h5py.Group | zarr.Group):
        return CSRSource(key, elem, path)
    if encoding == "array" and isinstance(elem, h5py.Dataset | zarr.Array) and len(elem.shape) == 2:
        return DenseSource(key, elem, path)
    msg = f"{path}: {key} has encoding {encoding!r}; convert reads CSR or dense matrices"
    raise StoreFormatError(msg)


def _check_csr(
    path: Path,
    key: str,
    shape: tuple[int, ...],
    indptr: ArrayNode,
    indices: ArrayNode,
    data: ArrayNode,
) -> None:
    if len(shape) != 2 or indptr.shape != (shape[0] + 1,) or indices.shape != data.shape:
        msg = (
            f"{path}: {key} is a malformed CSR matrix (shape {shape}, indptr {indptr.shape}, "
            f"indices {indices.shape}, data {data.shape})"
        )
        raise StoreFormatError(msg)
    if int(np.asarray(indptr[shape[0]])) > data.shape[0]:
        msg = f"{path}: {key} indptr points past the end of data ({data.shape[0]} values)"
        raise StoreFormatError(msg)
