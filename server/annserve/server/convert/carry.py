"""Elements of an input besides X, layers, obs and var that ``annserve convert`` carries.

Carried into every group: ``obsm`` (dense numeric arrays and CSR matrices, read by row
range and permuted with the rows exactly like X), ``raw`` (``raw/X``, CSR or dense,
read by row range like X; ``raw/var`` read whole), ``varm`` and ``uns`` (read whole,
with anndata's readers). Not carried, and named by :attr:`Extras.dropped`: ``obsp`` and
``varp`` (cell x cell and gene x gene graphs, which a row shuffle would scramble),
``raw/varm``, and obsm elements of other encodings (DataFrames, CSC matrices, strings).
Legacy (anndata < 0.7) files are read through the :class:`anndata.AnnData` opened with
``backed="r"`` (their obsm, varm and uns are then in memory; ``raw.X`` stays on disk).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from annserve.server.convert.matrix import DenseSource, Matrix, SparseRows

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)

#: Element groups never carried: their rows and columns are both cells (or both genes).
PAIRWISE = ("obsp", "varp")


@dataclass(frozen=True, slots=True)
class ObsmInfo:
    """One obsm element of an input.

    Attributes
    ----------
    key
        Its name in obsm.
    sparse
        True for a CSR matrix, False for a dense array.
    tail
        Its shape after the rows, e.g. ``(50,)``.
    dtype
        dtype of its values.
    """

    key: str
    sparse: bool
    tail: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class Extras:
    """What an input holds besides X, layers and obs.

    Attributes
    ----------
    obsm
        Its carriable obsm elements, by key.
    varm
        Its varm, by key, shapes ``(n_vars, ...)``.
    uns
        Its uns.
    raw_var
        ``raw/var`` (index: gene names), None without raw.
    dropped
        Names of the elements that cannot be carried (``"obsp/<key>"``, ...).
    """

    obsm: dict[str, ObsmInfo] = field(default_factory=dict)
    varm: dict[str, Any] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)
    raw_var: pd.DataFrame | None = None
    dropped: tuple[str, ...] = ()


class ObsmRows:
    """Row-range reads of one obsm element: dense rows, or CSR parts."""

    def __init__(self, info: ObsmInfo, element: Any, path: Path) -> None:
        self.info = info
        self._sparse = SparseRows(f"obsm/{info.key}", element, path) if info.sparse else None
        self._dense = element

    def read(self, start: int, stop: int) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``[start, stop)``: shape ``(stop - start, *tail)``, or CSR parts."""
        if self._sparse is not None:
            return self._sparse.read(start, stop)
        return np.asarray(self._dense[start:stop])


def child_keys(root: h5py.Group | zarr.Group, key: str) -> list[str]:
    """Return the keys of the group ``root[key]``; none if it is absent or not a group."""
    node = root.get(key)
    return list(node.keys()) if isinstance(node, h5py.Group | zarr.Group) else []


def _element(root: h5py.Group | zarr.Group, key: str) -> Any:
    """Return an element as something sliced by rows, or None if it cannot be carried."""
    elem = root[key]
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding == "csr_matrix" and isinstance(elem, h5py.Group | zarr.Group):
        return ad.io.sparse_dataset(elem)
    if encoding == "array" and isinstance(elem, h5py.Dataset | zarr.Array):
        return elem
    return None


def _obsm_info(key: str, element: Any, n_obs: int) -> ObsmInfo | None:
    """Return the element's type, or None if it cannot be carried (DataFrames, CSC, str)."""
    if element is None or isinstance(element, pd.DataFrame):
        return None
    sparse = sp.isspmatrix_csr(element) or isinstance(element, ad.abc.CSRDataset)
    dense = isinstance(element, h5py.Dataset | zarr.Array | np.ndarray)
    shape = tuple(int(s) for s in element.shape)
    if not (sparse or dense) or len(shape) < 2 or shape[0] != n_obs:
        return None
    dtype = np.dtype(element.dtype)
    return ObsmInfo(key, sparse, shape[1:], dtype) if dtype.kind in "biuf" else None


def read_extras(
    root: h5py.Group | zarr.Group, path: Path, n_obs: int, legacy: ad.AnnData | None
) -> tuple[Extras, dict[str, ObsmRows], Matrix | None]:
    """Read what an input holds besides X, layers and obs.

    Parameters
    ----------
    root
        The input's root group.
    path
        The input, for messages.
    n_obs
        Rows of X.
    legacy
        The input opened by :func:`anndata.read_h5ad` (``backed="r"``) for the
        compound-dataset layout of anndata < 0.7; None otherwise.

    Returns
    -------
    The extras, the obsm row readers by key and the ``raw/X`` reader (None without raw).
    """
    if legacy is not None:
        obsm = dict(legacy.obsm)
        varm, uns = dict(legacy.varm), dict(legacy.uns)
        raw = legacy.raw
        raw_x = None if raw is None else raw.X
        raw_var = None if raw is None else raw.var
        raw_varm = {} if raw is None else dict(raw.varm)
        pairwise = [f"{k}/{n}" for k in PAIRWISE for n in getattr(legacy, k)]
    else:
        obsm = {k: _element(root, f"obsm/{k}") for k in child_keys(root, "obsm")}
        varm = ad.io.read_elem(root["varm"]) if "varm" in root else {}
        uns = ad.io.read_elem(root["uns"]) if "uns" in root else {}
        raw_x = _element(root, "raw/X") if "raw/X" in root else None
        raw_var = ad.io.read_elem(root["raw/var"]) if "raw/var" in root else None
        raw_varm = ad.io.read_elem(root["raw/varm"]) if "raw/varm" in root else {}
        pairwise = [f"{k}/{n}" for k in PAIRWISE for n in child_keys(root, k)]
    infos = {k: _obsm_info(k, e, n_obs) for k, e in obsm.items()}
    readers = {k: ObsmRows(i, obsm[k], path) for k, i in infos.items() if i is not None}
    dropped = [*pairwise, *(f"obsm/{k}" for k, i in infos.items() if i is None)]
    dropped += [f"raw/varm/{k}" for k in raw_varm]
    raw_rows = _raw_rows(raw_x, path)
    if raw_rows is None and raw_var is not None:
        dropped.append("raw")
    extras = Extras(
        {k: r.info for k, r in readers.items()},
        varm,
        uns,
        raw_var if raw_rows is not None else None,
        tuple(dropped),
    )
    return extras, readers, raw_rows


def _raw_rows(raw_x: Any, path: Path) -> Matrix | None:
    """``raw/X`` as a row reader: CSR through anndata's sparse dataset, or dense."""
    if raw_x is None:
        return None
    if isinstance(raw_x, ad.abc.CSRDataset) or sp.isspmatrix_csr(raw_x):
        return SparseRows("raw/X", raw_x, path)
    if isinstance(raw_x, h5py.Dataset | zarr.Array | np.ndarray) and len(raw_x.shape) == 2:
        return DenseSource("raw/X", raw_x, path)
    return None  # CSC or another encoding
