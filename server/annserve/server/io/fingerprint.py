"""A store's fingerprint: what replicas of one service compare to serve the same content."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from annserve.server.io.store import Store

#: Hex characters of a fingerprint (128 bits).
FINGERPRINT_HEX = 32


def fingerprint(store: Store) -> str:
    """Return a hex digest of what identifies a store's content, without reading values.

    It covers the shape, the names of every row (obs_names, so another shuffle of the
    same cells differs) and gene (var_names, raw's), the groups' sizes, and each
    servable matrix's key, dtype, layout, width and bytes (for CSR, its non-zeros).
    Two stores with equal fingerprints serve the same rows in the same order unless
    their values differ with every count above equal, which a copy or a re-conversion
    of other data does not produce. Reading every value would cost a full read of
    the store at each start.

    Parameters
    ----------
    store
        The opened store.

    Returns
    -------
    :data:`FINGERPRINT_HEX` lowercase hex characters (BLAKE2b).
    """
    digest = hashlib.blake2b(digest_size=FINGERPRINT_HEX // 2)
    _add(digest, [str(store.n_obs), str(store.n_vars)])
    for names in (store.obs_names, store.var_names, store.raw_var_names):
        _add(digest, names)
    _add(digest, [str(int(n)) for n in store.group_offsets])
    for key, spec in sorted(store.matrices.items()):
        row_bytes = store.mean_row_bytes(key)
        _add(digest, [key, spec.dtype.str, str(spec.sparse), str(spec.n_cols), repr(row_bytes)])
    return digest.hexdigest()


def _add(digest: hashlib.blake2b, values: Iterable[str]) -> None:
    """Feed a list of strings, with its length, so that no two lists feed the same bytes."""
    items = list(values)
    digest.update(f"{len(items)}\n".encode())
    digest.update("\0".join(items).encode("utf-8", "surrogatepass"))
    digest.update(b"\n")
