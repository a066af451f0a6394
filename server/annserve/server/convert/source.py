"""Inputs of ``annserve convert``: validate one AnnData store and read it in row blocks.

X, the layers, ``raw/X`` and obsm are read by row range, so memory does not grow with
their size; obs, var, varm, uns and ``raw/var`` are read whole, once per open, with
anndata's readers (see :mod:`annserve.server.convert.obs` and
:mod:`annserve.server.convert.carry`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import zarr

from annserve.errors import StoreFormatError, StoreNotFoundError
from annserve.server.convert.carry import Extras, child_keys, read_extras
from annserve.server.convert.matrix import Matrix, MatrixInfo, open_matrix
from annserve.server.convert.obs import ColumnInfo, ObsColumn, read_obs_var
from annserve.server.io.legacy import is_legacy

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator, Sequence

    import numpy as np
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
        ``X``, the layers (the requested ones, or every readable one) and ``raw/X``
        (when it has a readable raw), by key.
    columns
        Its obs columns, by name, in on-disk order.
    size_bytes
        Size on disk, bytes.
    extras
        obsm, varm, uns, ``raw/var`` and the names of what cannot be carried (with
        the layers that cannot be read).
    """

    path: Path
    label: str
    n_obs: int
    n_vars: int
    var: pd.DataFrame
    matrices: dict[str, MatrixInfo]
    columns: dict[str, ColumnInfo]
    size_bytes: int
    extras: Extras


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
        By name: the rows of the obs column.
    obsm
        By key: dense rows, shape ``(n, *tail)``, or CSR parts as in ``matrices``.
    """

    obs_names: np.ndarray
    matrices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    columns: dict[str, ObsColumn]
    obsm: dict[str, np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]]


class Source:
    """One input opened read-only; use :func:`open_source`, as a context manager.

    Attributes
    ----------
    info
        What validation found.
    """

    def __init__(self, path: Path, label: str, layers: Sequence[str] | None) -> None:
        self._path = path
        self._file = h5py.File(path, "r") if path.is_file() else None
        self._legacy: ad.AnnData | None = None
        try:
            self._inspect(label, layers)
        except BaseException:
            self.close()
            raise

    def _inspect(self, label: str, layers: Sequence[str] | None) -> None:
        path = self._path
        root = self._file if self._file is not None else zarr.open_group(path, mode="r")
        self._x = open_matrix(root, "X", path)
        self._matrices: dict[str, Matrix] = {"X": self._x}
        n_obs, n_vars = self._x.shape
        if "obs" in root and is_legacy(root):
            logger.info("%s: legacy (anndata < 0.7) layout, read with anndata", path)
            self._legacy = ad.read_h5ad(path, backed="r")
        unreadable = self._open_layers(root, layers)
        self._names, columns, var = read_obs_var(root, path, n_obs, self._legacy)
        self._columns = {c.info.name: c for c in columns}
        extras, self._obsm, raw = read_extras(root, path, n_obs, self._legacy)
        if raw is not None:
            self._matrices["raw/X"] = raw
        _check_shapes(path, self._matrices, n_obs, n_vars, len(var))
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
            replace(extras, dropped=(*unreadable, *extras.dropped)),
        )

    def _open_layers(
        self, root: h5py.Group | zarr.Group, layers: Sequence[str] | None
    ) -> list[str]:
        """Open the given layers (each must be readable), or every readable one if None.

        Returns
        -------
        The names (``"layers/<name>"``) of the layers that cannot be read.
        """
        names = child_keys(root, "layers") if layers is None else list(layers)
        unreadable = []
        for name in names:
            key = f"layers/{name}"
            try:
                self._matrices[key] = open_matrix(root, key, self._path)
            except StoreFormatError:
                if layers is not None:
                    raise
                unreadable.append(key)
        return unreadable

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the input file."""
        if self._legacy is not None:
            self._legacy.file.close()
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
        yield from self._x.blocks(value_bytes, row_bytes, block_bytes)

    def read(
        self, start: int, stop: int, keys: Collection[str], columns: Collection[str]
    ) -> SourceBlock:
        """Read rows ``[start, stop)``: the obs names, the given matrices and columns.

        Parameters
        ----------
        start, stop
            The rows.
        keys
            Matrices (``"X"``, ``"layers/<name>"``, ``"raw/X"``) and obsm elements
            (``"obsm/<name>"``) to read.
        columns
            obs columns to read.

        Raises
        ------
        StoreFormatError
            If the stored data cannot be read (a truncated or corrupt file).
        """
        try:
            return SourceBlock(
                self._names[start:stop],
                {k: m.read(start, stop) for k, m in self._matrices.items() if k in keys},
                {
                    name: ObsColumn(
                        c.info,
                        c.values[start:stop],
                        None if c.mask is None else c.mask[start:stop],
                    )
                    for name, c in self._columns.items()
                    if name in columns
                },
                {k: r.read(start, stop) for k, r in self._obsm.items() if f"obsm/{k}" in keys},
            )
        except Exception as e:  # h5py/zarr raise OSError, ValueError... on corrupt data
            msg = f"{self._path}: cannot read rows {start}:{stop}: {e}"
            raise StoreFormatError(msg) from e


def _check_shapes(
    path: Path, matrices: dict[str, Matrix], n_obs: int, n_vars: int, var_len: int
) -> None:
    for key, m in matrices.items():
        if m.shape[0] != n_obs or (key != "raw/X" and m.shape != (n_obs, n_vars)):
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


def open_source(path: str | Path, label: str, layers: Sequence[str] | None = None) -> Source:
    """Open and validate one input.

    Parameters
    ----------
    path
        An ``.h5ad`` file or an AnnData zarr store.
    label
        Its value in the collection's ``dataset`` column.
    layers
        Layers to open, each of which must exist with X's shape; None opens every
        layer that can be read (the others are named in ``info.extras.dropped``).

    Returns
    -------
    The open input; close it (or use it as a context manager).

    Raises
    ------
    StoreNotFoundError
        If ``path`` does not exist.
    StoreFormatError
        If it is not an AnnData store with CSR or dense X, shapes disagree, var names
        repeat or a requested layer is missing. The message names the file.
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
