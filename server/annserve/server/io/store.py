"""Open AnnData stores read-only: one AnnData (``.h5ad`` or zarr) or a collection of them.

A :class:`Store` is what the server serves: one or more AnnData groups, seen as one
dataset of ``sum(n_obs)`` rows (global row = group offset + local row). Groups with
different genes are served in the union of their gene spaces (first-seen order, as
``annserve convert --var-join outer`` writes it): a gene a group lacks is zero in its
rows. Collections are zarr groups whose children are AnnData groups: the
output of ``annserve convert`` (its manifest gives the group order) or of
annbatch's ``DatasetCollection`` (groups in natural name order).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import zarr

from annserve.errors import StoreFormatError, StoreNotFoundError
from annserve.server.format import MANIFEST_KEY
from annserve.server.io.elements import element_at, group_at
from annserve.server.io.legacy import is_legacy, reencoded
from annserve.server.io.matrix import (
    CSRMatrix,
    CSRRows,
    DenseMatrix,
    DenseRows,
    LocatedCSR,
    open_matrix,
)
from annserve.server.io.obs import concat_obs, obs_column

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pandas as pd

    from annserve.buffers import BufferPool
    from annserve.server.format import Empty
    from annserve.server.io.elements import ArrayNode, GroupNode

logger = logging.getLogger(__name__)


class AnnDataGroup:
    """One AnnData element tree (an ``.h5ad`` root or a zarr group), opened read-only.

    Attributes
    ----------
    where
        Names the group in messages (path, plus the group name inside a collection).
    n_obs
        Rows (cells).
    var_names
        Gene names.
    raw_var_names
        Gene names of ``raw/X``; empty without ``.raw``.
    obs
        obs as anndata reads it, indexed by obs_names.
    matrices
        Row-readable matrices by key: ``"X"``, ``"layers/<name>"``, ``"raw/X"`` and
        ``"obsm/<name>"`` (numeric 2-d obsm arrays, dense or CSR), each of shape
        ``(n_obs, columns)``.
    """

    def __init__(self, root: GroupNode, where: str) -> None:
        self.where = where
        self.matrices = _open_matrices(root, where)
        self.obs, var = _read_annotations(root, where)
        self.n_obs = len(self.obs)
        self.var_names = tuple(str(v) for v in var.index)
        self.raw_var_names = _raw_var_names(root, where) if "raw/X" in self.matrices else ()
        for key, m in self.matrices.items():
            columns = {"raw/X": len(self.raw_var_names)}.get(key, len(self.var_names))
            if m.shape[0] != self.n_obs or (not key.startswith("obsm/") and m.shape[1] != columns):
                msg = f"{where}: {key} has shape {m.shape}, obs x var is ({self.n_obs}, {columns})"
                raise StoreFormatError(msg)


def _open_matrices(root: GroupNode, where: str) -> dict[str, CSRMatrix | DenseMatrix]:
    """Open X, every layer, raw X and every numeric 2-d obsm array of a group."""
    matrices = {"X": open_matrix(element_at(root, "X", where), f"{where}: X")}
    for parent in ("layers", "obsm"):
        elems = _subgroup(root, parent)
        if elems is None:
            continue
        for name in elems:
            elem = element_at(elems, name, f"{where}: {parent}")
            if parent == "obsm" and not _row_matrix(elem):
                logger.info("%s: obsm/%s is not a numeric 2-d array; not served", where, name)
                continue
            matrices[f"{parent}/{name}"] = open_matrix(elem, f"{where}: {parent}/{name}")
    raw = _subgroup(root, "raw")
    if raw is not None and "X" in raw:
        matrices["raw/X"] = open_matrix(element_at(raw, "X", where), f"{where}: raw/X")
    return matrices


def _subgroup(root: GroupNode, key: str) -> GroupNode | None:
    """Return ``root[key]`` if it is a group (pre-0.7 h5ad files keep compound datasets)."""
    node = root.get(key)
    return node if isinstance(node, h5py.Group | zarr.Group) else None


def _row_matrix(elem: GroupNode | ArrayNode) -> bool:
    """Whether an element is a CSR matrix or a numeric 2-d array (what obsm may serve)."""
    encoding = elem.attrs.get("encoding-type", "array")
    if isinstance(elem, h5py.Dataset | zarr.Array):
        return encoding == "array" and len(elem.shape) == 2 and elem.dtype.kind in "biuf"
    return encoding == "csr_matrix"


def _raw_var_names(root: GroupNode, where: str) -> tuple[str, ...]:
    try:
        var = ad.io.read_elem(element_at(root, "raw/var", where))
    except Exception as e:  # anndata raises many types for a malformed element
        msg = f"{where}: cannot read raw/var: {e}"
        raise StoreFormatError(msg) from e
    return tuple(str(v) for v in var.index)


@dataclass(frozen=True, slots=True)
class MatrixSpec:
    """What a servable matrix holds, every group together.

    Attributes
    ----------
    dtype
        dtype holding the values of every group's matrix (groups of an ``annserve
        convert`` collection may differ: uint16 counts, float32 otherwise).
    sparse
        CSR (True) or dense.
    n_cols
        Columns: genes for X, layers and raw X; the array's width for obsm.
    index_dtype
        dtype of the column indices of every group's CSR matrix; None when dense, or
        when the groups' differ.
    """

    dtype: np.dtype
    sparse: bool
    n_cols: int
    index_dtype: np.dtype | None = None


class Store:
    """What the server serves: AnnData groups as one dataset, in one gene space.

    Attributes
    ----------
    path
        Where the store lies.
    n_obs, n_vars
        Rows in all groups together, genes.
    var_names
        Gene names, length ``n_vars``: the groups' own when they agree, else the union
        of theirs in first-seen order (X and layers are then read into it, zeros for a
        gene a group lacks).
    mixed_genes
        Whether the groups' gene spaces differ (requests must then accept missing genes
        as zeros, ``MISSING_GENES_ZEROS``).
    raw_var_names
        Gene names of raw X; empty when some group has no ``.raw`` (or the groups' raw
        genes differ).
    obs
        obs columns present in every group, concatenated in group order.
    obs_names
        Name of every row, shape ``(n_obs,)``, object array of str.
    obs_index_name
        Name of obs's index (``obs.index.name``), None for none.
    matrices
        Every matrix present in every group with the same layout, by key (``"X"``,
        ``"layers/<name>"``, ``"raw/X"``, ``"obsm/<name>"``).
    layers, obsm
        Names of the layers and obsm arrays among ``matrices``.
    group_offsets
        First global row of each group, then ``n_obs``: shape ``(n_groups + 1,)``, int64.
    x_sparse, x_dtype
        Layout and dtype of X (``matrices["X"]``).
    """

    def __init__(self, path: Path, groups: Sequence[AnnDataGroup]) -> None:
        self.path = path
        self._groups = list(groups)
        first = self._groups[0]
        self.mixed_genes = any(g.var_names != first.var_names for g in self._groups[1:])
        #: per group, the union position of each of its genes (None: one gene space)
        self._gene_maps: list[np.ndarray] | None = None
        if self.mixed_genes:
            union = dict.fromkeys(v for g in self._groups for v in g.var_names)
            position = {v: i for i, v in enumerate(union)}
            self._gene_maps = [
                np.array([position[v] for v in g.var_names], dtype=np.int64) for g in self._groups
            ]
            self.var_names = tuple(union)
        else:
            self.var_names = first.var_names
        self.n_vars = len(self.var_names)
        same_raw = all(g.raw_var_names == first.raw_var_names for g in self._groups)
        self.raw_var_names = first.raw_var_names if same_raw else ()
        self.group_offsets = np.cumsum([0] + [g.n_obs for g in self._groups], dtype=np.int64)
        self.n_obs = int(self.group_offsets[-1])
        obs = concat_obs([g.obs for g in self._groups])
        self.obs = {str(k): obs_column(str(k), obs[k]) for k in obs.columns}
        self.obs_names = obs.index.to_numpy(dtype=object).astype(str).astype(object)
        self.obs_index_name = self._groups[0].obs.index.name
        self.matrices = self._common_matrices()
        self.layers = tuple(k.removeprefix("layers/") for k in self.matrices if k[:7] == "layers/")
        self.obsm = tuple(k.removeprefix("obsm/") for k in self.matrices if k[:5] == "obsm/")
        self.x_sparse = self.matrices["X"].sparse
        self.x_dtype = self.matrices["X"].dtype

    def _common_matrices(self) -> dict[str, MatrixSpec]:
        """Matrices every group has, with one layout and width (raw X: the same raw genes)."""
        out = {}
        for key in sorted(self._groups[0].matrices, key=lambda k: (k != "X", k)):
            parts = [g.matrices.get(key) for g in self._groups]
            present = [m for m in parts if m is not None]
            in_union = self.mixed_genes and _in_gene_space(key)  # widths: each group's genes
            shapes = {(m.sparse, self.n_vars if in_union else m.shape[1]) for m in present}
            if (
                len(present) < len(parts)
                or len(shapes) > 1
                or (key == "raw/X" and not self.raw_var_names)
            ):
                logger.info("%s: %s is not in every group alike; not served", self.path, key)
                continue
            ((sparse, n_cols),) = shapes
            index_dtypes = {m.index_dtype for m in present if isinstance(m, CSRMatrix)}
            index_dtype = index_dtypes.pop() if len(index_dtypes) == 1 else None
            dtype = np.result_type(*(m.dtype for m in present))
            out[key] = MatrixSpec(dtype, sparse, n_cols, index_dtype)
        return out

    def mean_row_bytes(self, key: str = "X") -> float:
        """Return the mean bytes of one row of a matrix (a key of :attr:`matrices`) once read."""
        return sum(g.matrices[key].nbytes for g in self._groups) / max(1, self.n_obs)

    def read_rows(
        self,
        rows: np.ndarray,
        key: str = "X",
        pool: BufferPool | None = None,
        *,
        narrow: bool = False,
    ) -> CSRRows | DenseRows:
        """Read rows of a matrix.

        Parameters
        ----------
        rows
            Global row indices, shape ``(n,)``, int64, strictly increasing.
        key
            One of :attr:`matrices`: ``"X"``, ``"layers/<name>"``, ``"raw/X"`` or
            ``"obsm/<name>"``.
        pool
            Where the large arrays come from; a stream passes its own so that each
            preload buffer reuses the memory of one it has finished with.
        narrow
            CSR ``indices`` and ``data`` may come back uint16 where the decoded-chunk
            cache holds them so (:meth:`CSRMatrix.read_rows_narrow`), for a consumer
            that sends them so (the ``compact`` encoding). Dense matrices, and X and
            layers of groups with different genes, are read as stored.

        Returns
        -------
        The rows in the given order, CSR or dense as stored.
        """
        empty = pool.empty if pool is not None else np.empty
        if self._gene_maps is not None and _in_gene_space(key):
            bounds = np.searchsorted(rows, self.group_offsets)
            return self._read_union(rows, key, bounds, empty)
        pieces = self._pieces(rows, key)
        if narrow and all(isinstance(m, CSRMatrix) for m, _ in pieces):
            parts = [m.read_rows_narrow(r, empty) for m, r in pieces if isinstance(m, CSRMatrix)]
            return parts[0] if len(parts) == 1 else _concat_csr(parts, empty)
        return _read_pieces(pieces, empty)

    def cached(self, key: str = "X") -> bool:
        """Whether every group's ``key`` is CSR whose values the decoded-chunk cache serves.

        Its rows may then be located in the cache (:meth:`locate_rows`), uint16 where
        the cache narrowed the chunks they lie in.
        """
        return all(isinstance(m := g.matrices[key], CSRMatrix) and m.cached for g in self._groups)

    def locate_rows(
        self, rows: np.ndarray, key: str = "X", *, narrow: bool = False
    ) -> LocatedCSR | None:
        """Locate rows of a CSR matrix in the store's mapped files or the decoded-chunk cache.

        Parameters
        ----------
        rows, key, narrow
            As for :meth:`read_rows`.

        Returns
        -------
        The rows in the given order, as stored, or uint16 where ``narrow`` allows
        (:meth:`CSRMatrix.locate_rows`); None where they must be read: a dense
        matrix, arrays read through zarr or h5py without the cache (or before their
        first read), groups of different dtypes, or X and layers of groups with
        different genes (renumbered into the union's columns).

        Raises
        ------
        DataLossError
            If a chunk the rows use is absent, or its file is truncated or cannot be opened.
        """
        if self._gene_maps is not None and _in_gene_space(key):
            return None
        parts = []
        for matrix, local in self._pieces(rows, key):
            located = matrix.locate_rows(local, narrow) if isinstance(matrix, CSRMatrix) else None
            if located is None:
                return None
            parts.append(located)
        return LocatedCSR.concat(parts)

    def _pieces(self, rows: np.ndarray, key: str) -> list[Piece]:
        """Split sorted global rows by group: each group's matrix and its rows in it."""
        bounds = np.searchsorted(rows, self.group_offsets)
        pieces = [
            (g.matrices[key], rows[a:b] - offset)
            for g, a, b, offset in zip(
                self._groups, bounds[:-1], bounds[1:], self.group_offsets, strict=False
            )
            if b > a
        ]
        return pieces or [(self._groups[0].matrices[key], rows)]

    def _read_union(
        self, rows: np.ndarray, key: str, bounds: np.ndarray, empty: Empty
    ) -> CSRRows | DenseRows:
        """Read rows of X or a layer of groups with different genes into the union's columns."""
        assert self._gene_maps is not None
        spec = self.matrices[key]
        parts = [
            (g.matrices[key], rows[a:b] - offset, genes, a, b)
            for g, genes, a, b, offset in zip(
                self._groups,
                self._gene_maps,
                bounds[:-1],
                bounds[1:],
                self.group_offsets,
                strict=False,
            )
            if b > a
        ]
        if not spec.sparse:
            values = np.zeros((len(rows), self.n_vars), spec.dtype)
            for m, r, genes, a, b in parts:
                assert isinstance(m, DenseMatrix)
                values[a:b][:, genes] = m.read_rows(r).values
            return DenseRows(values)
        if not parts:
            return CSRRows(np.zeros(1, np.int64), np.empty(0, np.int64), np.empty(0, spec.dtype))
        block = _read_pieces([(m, r) for m, r, *_ in parts], empty)
        assert isinstance(block, CSRRows)
        indptr, indices = block.indptr, np.empty(len(block.indices), np.int64)
        for _, _, genes, a, b in parts:
            start, stop = indptr[a - parts[0][3]], indptr[b - parts[0][3]]
            indices[start:stop] = genes[block.indices[start:stop]]
        data = block.data
        if not all(np.all(np.diff(genes) > 0) for _, _, genes, *_ in parts):
            # a group's genes in another order than the union's: sort each row's columns
            row = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
            order = np.lexsort((indices, row))
            indices, data = indices[order], data[order]
        return CSRRows(indptr, indices, data)


def _in_gene_space(key: str) -> bool:
    """Whether a matrix's columns are the store's genes (X and layers; not raw X, obsm)."""
    return key == "X" or key.startswith("layers/")


Piece = tuple[CSRMatrix | DenseMatrix, np.ndarray]


def _read_pieces(pieces: list[Piece], empty: Empty) -> CSRRows | DenseRows:
    """Read rows of several groups into one buffer from ``empty`` (no concatenation copy).

    Groups of different dtypes are read one by one and concatenated instead.
    """
    dense = [(m, r) for m, r in pieces if isinstance(m, DenseMatrix)]
    sparse = [(m, r) for m, r in pieces if isinstance(m, CSRMatrix)]
    if dense and sparse:  # a store's groups agree on the layout of each matrix
        msg = "the groups of a store mix CSR and dense layouts of one matrix"
        raise StoreFormatError(msg)
    return _read_dense(dense, empty) if dense else _read_csr(sparse, empty)


def _read_dense(pieces: list[tuple[DenseMatrix, np.ndarray]], empty: Empty) -> DenseRows:
    first = pieces[0][0]
    if any(m.dtype != first.dtype for m, _ in pieces):
        return DenseRows(np.concatenate([m.read_rows(r).values for m, r in pieces]))
    values = empty((sum(len(r) for _, r in pieces), first.shape[1]), first.dtype)
    starts = np.cumsum([0] + [len(r) for _, r in pieces])
    for (m, r), a in zip(pieces, starts, strict=False):
        m.read_rows(r, DenseRows(values[a : a + len(r)]))
    return DenseRows(values)


def _read_csr(pieces: list[tuple[CSRMatrix, np.ndarray]], empty: Empty) -> CSRRows:
    first = pieces[0][0]
    if any(m.dtype != first.dtype or m.index_dtype != first.index_dtype for m, _ in pieces):
        return _concat_csr([m.read_rows(r) for m, r in pieces], empty)
    sizes = [m.nnz(r) for m, r in pieces]
    indices = empty((sum(sizes),), first.index_dtype)
    data = empty((sum(sizes),), first.dtype)
    indptrs, offset = [np.zeros(1, np.int64)], 0
    for (m, r), n in zip(pieces, sizes, strict=True):
        part = m.read_rows(
            r, CSRRows(indptrs[0], indices[offset : offset + n], data[offset : offset + n])
        )
        indptrs.append(part.indptr[1:] + offset)
        offset += n
    return CSRRows(np.concatenate(indptrs), indices, data)


def _concat_csr(parts: list[CSRRows], empty: Empty) -> CSRRows:
    """Concatenate CSR rows into arrays from ``empty``, of the parts' common dtypes."""
    nnz = np.cumsum([0] + [len(p.data) for p in parts[:-1]], dtype=np.int64)
    indptr = np.concatenate(
        [np.zeros(1, np.int64)] + [p.indptr[1:] + n for p, n in zip(parts, nnz, strict=True)]
    )
    return CSRRows(
        indptr, _joined([p.indices for p in parts], empty), _joined([p.data for p in parts], empty)
    )


def _joined(arrays: list[np.ndarray], empty: Empty) -> np.ndarray:
    out = empty((sum(len(a) for a in arrays),), np.result_type(*arrays))
    return np.concatenate(arrays, out=out)


def _read_annotations(root: GroupNode, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read obs and var with anndata's readers."""
    try:
        obs = ad.io.read_elem(element_at(root, "obs", where))
        var = ad.io.read_elem(element_at(root, "var", where))
    except StoreFormatError:
        raise
    except Exception as e:  # anndata raises many types for a malformed element
        msg = f"{where}: cannot read obs/var: {e}"
        raise StoreFormatError(msg) from e
    return obs, var


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _manifest_groups(manifest: object, path: Path) -> list[tuple[str, int]]:
    """Return the ``(name, n_obs)`` of each group a manifest lists."""
    try:
        entries = manifest["groups"]  # type: ignore[index]  # any failure is caught below
        return [(str(g["name"]), int(g["n_obs"])) for g in entries]
    except (KeyError, TypeError, ValueError) as e:
        msg = f"{path}: malformed manifest: {e!r}"
        raise StoreFormatError(msg) from e


def _collection_groups(root: zarr.Group, path: Path) -> list[AnnDataGroup]:
    manifest = root.attrs.get(MANIFEST_KEY)
    listed = None if manifest is None else _manifest_groups(manifest, path)
    names: list[str]
    if listed is not None:
        names = [name for name, _ in listed]
    else:
        names = sorted((k for k, v in root.groups() if "X" in v), key=_natural_key)
    if not names:
        msg = f"{path}: neither an AnnData store nor a collection of AnnData groups"
        raise StoreFormatError(msg)
    groups = []
    for name in names:
        if name not in root:
            msg = f"{path}: collection group {name!r} is missing (truncated store?)"
            raise StoreFormatError(msg)
        groups.append(AnnDataGroup(group_at(root, name, str(path)), f"{path}/{name}"))
    if listed is not None:
        expected = [n for _, n in listed]
        if [g.n_obs for g in groups] != expected:
            msg = f"{path}: group sizes {[g.n_obs for g in groups]} differ from the manifest's"
            raise StoreFormatError(msg)
    return groups


def _open_groups(path: Path) -> list[AnnDataGroup]:
    try:
        root = h5py.File(path, "r") if path.is_file() else zarr.open_group(path, mode="r")
    except Exception as e:  # h5py/zarr raise OSError, ValueError, KeyError... on foreign files
        msg = f"{path}: not a readable .h5ad file or zarr store: {e}"
        raise StoreFormatError(msg) from e
    if isinstance(root, zarr.Group) and "X" not in root:
        return _collection_groups(root, path)
    if isinstance(root, h5py.File) and "obs" in root and is_legacy(root):
        root = reencoded(path)
    return [AnnDataGroup(root, str(path))]


def open_store(path: str | Path) -> Store:
    """Open an AnnData store or collection read-only.

    Parameters
    ----------
    path
        An ``.h5ad`` file, an AnnData zarr store (v2 or v3 format), or a zarr group of
        AnnData groups (``annserve convert`` output or an annbatch ``DatasetCollection``).

    Returns
    -------
    The opened store; it keeps its files open for the life of the process.

    Raises
    ------
    StoreNotFoundError
        If ``path`` does not exist.
    StoreFormatError
        If ``path`` is not a readable AnnData store of CSR or dense matrices, or the
        groups of a collection are missing.
    """
    p = Path(path)
    if not p.exists():
        msg = f"store not found: {p}"
        raise StoreNotFoundError(msg)
    try:
        store = Store(p, _open_groups(p))
    except StoreFormatError:
        raise
    except Exception as e:  # a malformed element: missing arrays, wrong attrs, bad shapes
        msg = f"{p}: not a readable AnnData store: {e!r}"
        raise StoreFormatError(msg) from e
    logger.info(
        "opened %s: %d obs x %d vars in %d group(s), %s X (%s), layers %s, obsm %s, raw %s",
        p,
        store.n_obs,
        store.n_vars,
        len(store.group_offsets) - 1,
        "CSR" if store.x_sparse else "dense",
        store.x_dtype,
        list(store.layers),
        list(store.obsm),
        "raw/X" in store.matrices,
    )
    return store
