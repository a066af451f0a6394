"""Pre-0.7 ``.h5ad`` files, re-encoded in memory with the current AnnData encodings.

anndata before 0.7 wrote obs, var and obsm as compound datasets, sparse matrices as
``h5sparse`` groups and raw as ``raw.X``/``raw.var``. anndata still reads them; rather
than a second set of readers, annserve lets anndata read such a file whole and writes
what it serves (X, layers, obsm, raw, obs, var) into an in-memory zarr group, which
then opens like any current store. Files of that age are small (pbmc68k_reduced is
700 cells); a large one should be rewritten with current anndata.
"""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import zarr
from zarr.storage import MemoryStore

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)


def is_legacy(root: h5py.Group | zarr.Group) -> bool:
    """Whether ``root`` has the layout of anndata < 0.7 (obs a compound dataset, or untagged).

    Raises
    ------
    KeyError
        If ``root`` has no obs.
    """
    obs = root["obs"]
    return isinstance(obs, h5py.Dataset) or obs.attrs.get("encoding-type") != "dataframe"


def reencoded(path: Path) -> zarr.Group:
    """Read a pre-0.7 ``.h5ad`` with anndata and return its served elements as zarr.

    Returns
    -------
    An in-memory zarr v3 group holding X, layers, obsm, raw, obs and var in the
    current encodings (uns, obsp and varm are left out: annserve serves none of them).
    """
    with warnings.catch_warnings():  # one line below says it; not one warning per element
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        warnings.simplefilter("ignore", FutureWarning)  # uns graphs moved to obsp, unused
        adata = ad.read_h5ad(path)
    served = ad.AnnData(
        X=adata.X, obs=adata.obs, var=adata.var, layers=adata.layers, obsm=adata.obsm
    )
    if adata.raw is not None:
        served.raw = adata.raw.to_adata()
    root = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    with ad.settings.override(auto_shard_zarr_v3=False):
        ad.io.write_elem(root, "/", served)
    logger.warning(
        "%s: written by anndata < 0.7; read whole into memory (rewrite it with current "
        "anndata to serve it from disk)",
        path,
    )
    return root
