"""Inputs of ``annserve convert``: validate one AnnData store and read it in row blocks.

Everything is read by row range (``X``, the requested layers, the obs index and
columns; see :mod:`annserve.server.convert.obs` for the exceptions), so memory does
not grow with the size of an input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import zarr

from annserve.errors import StoreFormatError, StoreNotFoundError
from annserve.server.convert.matrix import Matrix, MatrixInfo, open_matrix
from annserve.server.convert.obs import ColumnInfo, check_obs_lengths, read_annotations

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    import pandas as pd

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What validation learnt about one input.

    Attributes
    ----------
    path
        The input, as given.
    label
        Its value in the collection's ``dataset`` obs column.
    n_obs, n_vars
        Shape of X (cells, genes).
    var
        Its var DataFrame (index: gene names, unique).
    matrices
        ``X`` and the requested layers, by key.
    columns
        Its obs columns, by name, in on-disk order.
    size_bytes
        Size on disk, bytes.
    """

    path: Path
    label: str
    n_obs: int
    n_vars: int
    var: pd.DataFrame
    matrices: dict[str, MatrixInfo]
    columns: dict[str, ColumnInfo]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class SourceBlock:
    """Rows ``[start, stop)`` of one input, in its own gene space.

    Attributes
    ----------
    obs_names
        Shape ``(n,)``, object array of str.
    matrices
        By key: ``(row_nnz, indices, data)``, shapes ``(n,)`` int64, ``(nnz,)``, ``(nnz,)``.
    columns
        By name: categorical codes, numeric values or str objects, shape ``(n,)``.
    """

    obs_names: np.ndarray
    matrices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    columns: dict[str, np.ndarray]


class Source:
    """One input opened read-only; use :func:`open_source`, as a context manager.

    Attributes
    ----------
    info
        What validation found.
    """

    def __init__(self, path: Path, label: str, layers: Sequence[str]) -> None:
        self._path = path
        self._file = h5py.File(path, "r") if path.is_file() else None
        try:
            self._inspect(label, layers)
        except BaseException:
            self.close()
            raise

    def _inspect(self, label: str, layers: Sequence[str]) -> None:
        path = self._path
        root = self._file if self._file is not None else zarr.open_group(path, mode="r")
        self._matrices = {"X": open_matrix(root, "X", path)}
        for layer in layers:
            self._matrices[f"layers/{layer}"] = open_matrix(root, f"layers/{layer}", path)
        names, columns, var = read_annotations(root, path)
        self._names, self._columns = names, columns
        first = next(iter(self._matrices.values()))
        n_obs, n_vars = first.shape
        _check_shapes(path, self._matrices, n_obs, n_vars, len(var))
        check_obs_lengths(path, root, n_obs)
        _check_unique(path, var.index)
        self.info = SourceInfo(
            path,
            label,
            n_obs,
            n_vars,
            var,
            {k: m.info for k, m in self._matrices.items()},
            {c.info.name: c.info for c in columns},
            _size_bytes(path),
        )

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the input file."""
        if self._file is not None:
            self._file.close()

    def blocks(
        self, value_bytes: int, row_bytes: int, block_bytes: int
    ) -> Iterator[tuple[int, int]]:
        """Cut the rows into ``[start, stop)`` blocks of at most ``block_bytes`` (one row at least).

        Parameters
        ----------
        value_bytes
            Bytes a stored X value costs in memory (with its layer values), bytes.
        row_bytes
            Bytes a row costs besides its values (obs), bytes.
        block_bytes
            Target size of a block, bytes.
        """
        yield from self._matrices["X"].blocks(value_bytes, row_bytes, block_bytes)

    def read(self, start: int, stop: int, columns: Sequence[str]) -> SourceBlock:
        """Read rows ``[start, stop)``: the obs names, the matrices and the given columns.

        Raises
        ------
        StoreFormatError
            If the stored data cannot be read (a truncated or corrupt file).
        """
        try:
            return SourceBlock(
                np.asarray(self._names.read(start, stop), dtype=object),
                {k: m.read(start, stop) for k, m in self._matrices.items()},
                {c.info.name: c.read(start, stop) for c in self._columns if c.info.name in columns},
            )
        except Exception as e:  # h5py/zarr raise OSError, ValueError... on corrupt data
            msg = f"{self._path}: cannot read rows {start}:{stop}: {e}"
            raise StoreFormatError(msg) from e


def _check_shapes(
    path: Path, matrices: dict[str, Matrix], n_obs: int, n_vars: int, var_len: int
) -> None:
    for key, m in matrices.items():
        if m.shape != (n_obs, n_vars):
            msg = f"{path}: {key} has shape {m.shape}, X has {(n_obs, n_vars)}"
            raise StoreFormatError(msg)
    if var_len != n_vars:
        msg = f"{path}: var has {var_len} rows but X has {n_vars} columns"
        raise StoreFormatError(msg)


def _check_unique(path: Path, names: pd.Index) -> None:
    duplicated = names[names.duplicated()]
    if len(duplicated):
        shown = ", ".join(repr(str(n)) for n in duplicated.unique()[:5])
        msg = (
            f"{path}: var names are not unique ({len(duplicated)} duplicates, e.g. {shown}); "
            "make them unique first (AnnData.var_names_make_unique)"
        )
        raise StoreFormatError(msg)


def _size_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def open_source(path: str | Path, label: str, layers: Sequence[str] = ()) -> Source:
    """Open and validate one input.

    Parameters
    ----------
    path
        An ``.h5ad`` file or an AnnData zarr store.
    label
        Its value in the collection's ``dataset`` column.
    layers
        Layers that must exist, with X's shape.

    Returns
    -------
    The open input; close it (or use it as a context manager).

    Raises
    ------
    StoreNotFoundError
        If ``path`` does not exist.
    StoreFormatError
        If it is not an AnnData store with CSR or dense X, shapes disagree, var names
        repeat or a layer is missing. The message names the file.
    """
    p = Path(path)
    if not p.exists():
        msg = f"input not found: {p}"
        raise StoreNotFoundError(msg)
    try:
        return Source(p, label, layers)
    except StoreFormatError:
        raise
    except Exception as e:  # h5py/zarr raise OSError, KeyError... on foreign or truncated files
        msg = f"{p}: not a readable AnnData store: {e}"
        raise StoreFormatError(msg) from e
