"""``StoreInfo``: what ``DescribeStore`` tells a client about a store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from annserve.server.io.obs import ObsColumnData
    from annserve.server.io.store import Store


def store_info(store: Store, name: str, fingerprint: str) -> pb.StoreInfo:
    """Describe a store: shape, genes, obs columns, servable matrices and obsm arrays.

    Parameters
    ----------
    store
        The opened store.
    name
        Its configured name.
    fingerprint
        Its :func:`~annserve.server.io.fingerprint.fingerprint`.
    """
    matrices = {k: m for k, m in store.matrices.items() if not k.startswith("obsm/")}
    return pb.StoreInfo(
        name=name,
        n_obs=store.n_obs,
        n_vars=store.n_vars,
        var_names=store.var_names,
        obs_columns=[_obs_column(c) for c in store.obs.values()],
        x_sparse=store.x_sparse,
        x_dtype=store.x_dtype.name,
        layers=store.layers,
        matrices=[
            pb.MatrixInfo(name=k, dtype=m.dtype.name, sparse=m.sparse, n_vars=m.n_cols)
            for k, m in matrices.items()
        ],
        raw_var_names=store.raw_var_names,
        obs_index_name=str(store.obs_index_name or ""),
        obsm=[
            pb.ObsmInfo(name=k, dtype=m.dtype.name, n_cols=m.n_cols, sparse=m.sparse)
            for k, m in ((k, store.matrices[f"obsm/{k}"]) for k in store.obsm)
        ],
        fingerprint=fingerprint,
    )


def _obs_column(column: ObsColumnData) -> pb.ObsColumn:
    return pb.ObsColumn(
        name=column.name,
        dtype=column.dtype,
        categories=column.categories,
        ordered=column.ordered,
        categories_dtype=column.categories_dtype,
        nullable=column.missing is not None,
    )
