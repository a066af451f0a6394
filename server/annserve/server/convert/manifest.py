"""The manifest of a converted collection: what it holds, stored in the root attributes.

``annserve convert`` writes it into ``attrs["annserve"]`` of the collection's root
group after every group is complete, then renames the finished store into place, so
a store without a valid manifest is not a collection. :func:`read_manifest` checks it
against the groups' metadata (one read when the metadata is consolidated).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from annserve.errors import StoreFormatError, StoreNotFoundError
from annserve.server.format import MANIFEST_KEY

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "GroupEntry",
    "Manifest",
    "SourceEntry",
    "read_manifest",
    "var_names_sha256",
]

#: Version of the collection layout this module writes and reads.
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class GroupEntry:
    """One AnnData group of the collection.

    Attributes
    ----------
    name
        Its key in the root group (``dataset_<i>``).
    n_obs
        Cells (rows).
    nnz
        Stored values of its X (non-zeros).
    """

    name: str
    n_obs: int
    nnz: int


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One input of the conversion.

    Attributes
    ----------
    path
        Absolute path at conversion time.
    name
        Its label in the ``dataset`` obs column.
    n_obs
        Cells (rows).
    size_bytes
        Size on disk, bytes.
    """

    path: str
    name: str
    n_obs: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a collection holds; the collection's global rows are its groups' rows in order.

    Attributes
    ----------
    groups
        The AnnData groups, in collection order.
    n_obs
        Cells of the collection (sum over groups).
    n_vars
        Genes; every group has the same var.
    var_names_sha256
        Hex sha256 of the gene names, see :func:`var_names_sha256`.
    var_join
        ``"outer"`` or ``"inner"``.
    sources
        The inputs, in the order given.
    seed
        Seed of the shuffle.
    shuffle
        Whether cells were shuffled (else they are in input order).
    layers
        Layers each group holds besides X.
    obs_columns
        obs columns each group holds, ``dataset`` included.
    format_version
        Version of the layout.
    """

    groups: tuple[GroupEntry, ...]
    n_obs: int
    n_vars: int
    var_names_sha256: str
    var_join: str
    sources: tuple[SourceEntry, ...]
    seed: int
    shuffle: bool
    layers: tuple[str, ...]
    obs_columns: tuple[str, ...]
    format_version: int = FORMAT_VERSION

    @property
    def offsets(self) -> np.ndarray:
        """First global row of each group and the total, shape ``(n_groups + 1,)``, int64."""
        return np.concatenate([[0], np.cumsum([g.n_obs for g in self.groups])]).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        """Return the manifest as JSON-compatible values."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: object, where: str) -> Manifest:
        """Parse :meth:`to_json` output; ``where`` names the store in error messages.

        Keys this version does not know are ignored (later writers may add some).

        Raises
        ------
        StoreFormatError
            If fields are missing or of the wrong type, or the version is unknown.
        """
        if not isinstance(value, dict):
            msg = f"{where}: manifest is not a mapping"
            raise StoreFormatError(msg)
        version = value.get("format_version")
        if version != FORMAT_VERSION:
            msg = (
                f"{where}: collection format_version {version!r}; this annserve reads "
                f"version {FORMAT_VERSION}"
            )
            raise StoreFormatError(msg)
        try:
            fields = {k: v for k, v in value.items() if k in cls.__dataclass_fields__}
            fields["groups"] = tuple(GroupEntry(**g) for g in value["groups"])
            fields["sources"] = tuple(SourceEntry(**s) for s in value["sources"])
            fields["layers"] = tuple(value["layers"])
            fields["obs_columns"] = tuple(value["obs_columns"])
            return cls(**fields)
        except (KeyError, TypeError) as e:
            msg = f"{where}: malformed manifest: {e!r}"
            raise StoreFormatError(msg) from e


def var_names_sha256(names: Iterable[str]) -> str:
    """Hex sha256 of the UTF-8 bytes of every gene name followed by a newline, in order."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}\n".encode())
    return digest.hexdigest()


def read_manifest(path: str | Path) -> Manifest:
    """Read and check the manifest of a collection written by ``annserve convert``.

    Checks that every listed group exists with the listed cell count and the collection's
    gene count, and that the first group's gene names match ``var_names_sha256``.

    Parameters
    ----------
    path
        The collection (a zarr v3 directory).

    Returns
    -------
    The manifest.

    Raises
    ------
    StoreNotFoundError
        If ``path`` does not exist.
    StoreFormatError
        If ``path`` is not a zarr group, has no manifest (a foreign store, or a conversion
        that did not finish), or disagrees with its manifest (a truncated collection).
    """
    p = Path(path)
    if not p.exists():
        msg = f"collection not found: {p}"
        raise StoreNotFoundError(msg)
    try:
        root = zarr.open_group(p, mode="r")
        value = root.attrs.get(MANIFEST_KEY)
    except Exception as e:  # zarr raises many types on a foreign directory or file
        msg = f"{p}: not a zarr group: {e}"
        raise StoreFormatError(msg) from e
    if value is None:
        msg = (
            f"{p}: not an annserve collection (no {MANIFEST_KEY!r} manifest in the root "
            "attributes; an interrupted conversion leaves none)"
        )
        raise StoreFormatError(msg)
    manifest = Manifest.from_json(value, str(p))
    _check_groups(p, root, manifest)
    return manifest


def _check_groups(p: Path, root: zarr.Group, manifest: Manifest) -> None:
    if sum(g.n_obs for g in manifest.groups) != manifest.n_obs:
        msg = f"{p}: manifest group sizes do not add up to n_obs={manifest.n_obs}"
        raise StoreFormatError(msg)
    for i, g in enumerate(manifest.groups):
        try:
            group = _group(root[g.name], g.name)
            shape = _shape(_group(group["X"], "X").attrs["shape"])
            n_names = _index(_group(group["obs"], "obs")).shape[0]
            var_index = _index(_group(group["var"], "var"))
        except Exception as e:  # KeyError for a missing node, others on corrupt metadata
            msg = f"{p}: group {g.name!r} listed in the manifest is missing or incomplete: {e!r}"
            raise StoreFormatError(msg) from e
        found = (shape, n_names, var_index.shape[0])
        if found != ((g.n_obs, manifest.n_vars), g.n_obs, manifest.n_vars):
            msg = (
                f"{p}: group {g.name!r} holds X {shape}, {n_names} obs and "
                f"{var_index.shape[0]} var names; the manifest says "
                f"({g.n_obs}, {manifest.n_vars})"
            )
            raise StoreFormatError(msg)
        if i == 0 and _sha256_of(var_index) != manifest.var_names_sha256:
            msg = f"{p}: gene names of group {g.name!r} do not match the manifest"
            raise StoreFormatError(msg)


def _group(node: zarr.Group | zarr.Array[Any], name: str) -> zarr.Group:
    if not isinstance(node, zarr.Group):
        msg = f"{name} is not a group"
        raise TypeError(msg)
    return node


def _index(frame: zarr.Group) -> zarr.Array[Any]:
    """Return the index array of a dataframe element (named by its ``_index`` attribute)."""
    node = frame[str(frame.attrs["_index"])]
    if not isinstance(node, zarr.Array):
        msg = f"the index of {frame.name} is not an array"
        raise TypeError(msg)
    return node


def _sha256_of(names: zarr.Array[Any]) -> str:
    return var_names_sha256(str(v) for v in np.asarray(names[...]))


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) for v in value):
        msg = f"shape attribute {value!r} is not a list of integers"
        raise TypeError(msg)
    return tuple(int(v) for v in value)
