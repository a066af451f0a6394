"""``annserve inspect STORE``: what the daemon would serve from a store, and how it reads it.

Prints the store as the daemon opens it (cells x genes, groups, X/layers/raw with their
layout and dtype, obsm arrays, obs columns with their dtypes) and the on-disk layout of
each matrix array of the first group (dtype, chunks, shards, codecs), with the number
of groups whose array the direct-read path serves (``preadv`` straight from the chunk
files, no codec: uncompressed 1-d arrays in local files, e.g. CSR ``data``/``indices``
of ``.h5ad`` files or of ``annserve convert --compression none`` collections). Exit
codes: 0 printed, 2 bad arguments, 3 the store is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import zarr

from annserve.errors import StoreFormatError, StoreNotFoundError
from annserve.server.format import MANIFEST_KEY
from annserve.server.io.chunkfiles import ChunkFileRanges
from annserve.server.io.legacy import is_legacy
from annserve.server.io.store import open_store

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annserve.server.io.elements import ArrayNode, GroupNode

EXIT_USAGE, EXIT_STORE = 2, 3


def describe_store(path: str | Path) -> dict[str, Any]:
    """Describe a store as ``annserve inspect`` prints it.

    Parameters
    ----------
    path
        An ``.h5ad`` file, an AnnData zarr store or a collection (what ``--store`` takes).

    Returns
    -------
    dict
        Keys ``path``, ``n_obs``, ``n_vars``, ``groups``, ``mixed_genes``; ``matrices``
        by key (``"X"``, ``"layers/<name>"``, ``"raw/X"``) and ``obsm`` by name, each
        with ``layout`` (``"csr"`` or ``"dense"``), ``dtype`` and ``n_cols``; ``obs``,
        the dtype of each column; ``arrays``, each stored array of those matrices
        (``"X/data"``, ...) as in the first group (``dtype``, ``shape``, ``chunks``,
        ``shards``, ``codecs``) with ``direct``, how many groups' copies the direct-read
        path reads, of ``layout_groups`` (0 for a store held in memory).

    Raises
    ------
    StoreNotFoundError
        If ``path`` does not exist.
    StoreFormatError
        If it is not a store the daemon serves.
    """
    store = open_store(path)
    matrices = {
        key: {"layout": "csr" if m.sparse else "dense", "dtype": m.dtype.name, "n_cols": m.n_cols}
        for key, m in store.matrices.items()
        if not key.startswith("obsm/")
    }
    groups = _groups(Path(path))
    arrays: dict[str, dict[str, Any]] = {}
    for key in matrices:
        for name, root in groups:
            for array_key, array in _arrays(root, key):
                entry = arrays.setdefault(array_key, {**_layout(array), "direct": 0})
                entry["direct"] += _direct(array, f"{path}/{name}: {array_key}")
    return {
        "path": str(path),
        "n_obs": store.n_obs,
        "n_vars": store.n_vars,
        "groups": len(store.group_offsets) - 1,
        "mixed_genes": store.mixed_genes,
        "matrices": matrices,
        "obsm": {
            k: {
                "layout": "csr" if store.matrices[f"obsm/{k}"].sparse else "dense",
                "dtype": store.matrices[f"obsm/{k}"].dtype.name,
                "n_cols": store.matrices[f"obsm/{k}"].n_cols,
            }
            for k in store.obsm
        },
        "obs": {c.name: c.dtype for c in store.obs.values()},
        "arrays": arrays,
        "layout_groups": len(groups),
    }


def _groups(path: Path) -> list[tuple[str, GroupNode]]:
    """Open the AnnData groups of a store as stored (none for a pre-0.7 h5ad: in memory)."""
    if path.is_file():
        root = h5py.File(path, "r")
        return [] if "obs" in root and is_legacy(root) else [("", root)]
    group = zarr.open_group(path, mode="r")
    if "X" in group:
        return [("", group)]
    manifest = group.attrs.get(MANIFEST_KEY)
    if isinstance(manifest, dict) and isinstance(manifest.get("groups"), list):
        names = [str(g["name"]) for g in manifest["groups"]]
    else:
        names = sorted((k for k, v in group.groups() if "X" in v), key=_natural_key)
    return [(name, group[name]) for name in names]


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _arrays(root: GroupNode, key: str) -> list[tuple[str, ArrayNode]]:
    """Return the stored arrays of a matrix: ``data``/``indices``/``indptr``, or itself."""
    elem = root[key]
    if isinstance(elem, h5py.Dataset | zarr.Array):
        return [(key, elem)]
    return [(f"{key}/{part}", elem[part]) for part in ("data", "indices", "indptr") if part in elem]


def _layout(array: ArrayNode) -> dict[str, Any]:
    """dtype, shape, chunks, shards and codecs of an array."""
    if isinstance(array, h5py.Dataset):
        codecs = [f for f in (array.compression, "shuffle" if array.shuffle else None) if f]
        return {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "chunks": list(array.chunks) if array.chunks else None,
            "shards": None,
            "codecs": codecs,
        }
    codecs = [*array.filters, array.serializer, *array.compressors]
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "chunks": list(array.chunks),
        "shards": list(array.shards) if array.shards else None,
        "codecs": [type(c).__name__ for c in codecs if c is not None],
    }


def _direct(array: ArrayNode, name: str) -> int:
    """1 if the daemon reads this array straight from its files (1-d only), else 0."""
    if len(array.shape) != 1:
        return 0
    return int(ChunkFileRanges.open(array, name, complete=True) is not None)


def format_description(info: dict[str, Any]) -> str:
    """Render :func:`describe_store`'s result as ``annserve inspect`` prints it."""
    lines = [
        f"{info['path']}",
        f"  cells x genes  {info['n_obs']:,} x {info['n_vars']:,} in {info['groups']} group(s)"
        + (" (different gene spaces: served in their union)" if info["mixed_genes"] else ""),
    ]
    for key, m in info["matrices"].items():
        lines.append(f"  {key:<13}  {m['layout']} {m['dtype']}, {m['n_cols']:,} columns")
    obsm = ", ".join(
        f"{k} ({m['layout']} {m['dtype']}, {m['n_cols']})" for k, m in info["obsm"].items()
    )
    lines.append(f"  obsm           {obsm or '-'}")
    obs = ", ".join(f"{k} ({d})" for k, d in info["obs"].items())
    lines.append(f"  obs            {obs or '-'}")
    if not info["arrays"]:
        lines.append("  layout         held in memory (pre-0.7 h5ad, re-encoded when opened)")
    else:
        lines.append(
            f"  layout         first group's; direct: groups read by preadv, of "
            f"{info['layout_groups']}"
        )
    for key, a in info["arrays"].items():
        shards = f" shards {tuple(a['shards'])}" if a["shards"] else ""
        chunks = tuple(a["chunks"]) if a["chunks"] else "contiguous"
        codecs = ", ".join(a["codecs"]) or "none"
        if key.endswith("/indptr"):
            direct = "held in memory"
        elif len(a["shape"]) != 1:
            direct = "read by h5py/zarr (2-d)"
        else:
            direct = f"direct {a['direct']}/{info['layout_groups']}"
        lines.append(
            f"    {key:<18} {a['dtype']:<8} chunks {chunks}{shards}  codecs {codecs}  {direct}"
        )
    direct_keys = [k for k in info["matrices"] if _direct_matrix(info, k)]
    lines.append(f"  direct read    {', '.join(direct_keys) or 'no matrix'}")
    return "\n".join(lines)


def _direct_matrix(info: dict[str, Any], key: str) -> bool:
    """Whether every group's values and indices of a matrix are read straight from files."""
    parts = [a for k, a in info["arrays"].items() if k in (key, f"{key}/data", f"{key}/indices")]
    return bool(parts) and all(
        len(a["shape"]) == 1 and a["direct"] == info["layout_groups"] for a in parts
    )


def inspect_main(argv: Sequence[str]) -> int:
    """Run ``annserve inspect``; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="annserve inspect",
        description="Print what annserve would serve from a store and how it reads it.",
    )
    parser.add_argument("store", type=Path, help=".h5ad file, AnnData zarr store or collection")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    try:
        info = describe_store(args.store)
    except (StoreNotFoundError, StoreFormatError) as e:
        print(f"annserve inspect: {e}", file=sys.stderr)
        return EXIT_STORE
    print(json.dumps(info) if args.json else format_description(info))
    return 0
