""":func:`convert`: turn AnnData files into one shuffled, sharded zarr collection.

The command line (``annserve convert``) is :mod:`annserve.server.convert.cli`.

The collection is a zarr v3 group whose children ``dataset_0``, ``dataset_1``, ... are
AnnData zarr groups (each readable by :func:`anndata.read_zarr`) with CSR X and layers
in the joined gene space, the obs columns (with their pandas dtypes: categoricals,
nullable integers/booleans/strings) plus a categorical ``dataset`` column naming each
cell's input, the same var, and what the inputs hold besides: obsm (dense and CSR,
permuted with the rows like X), ``raw`` (CSR ``raw/X`` permuted like X, ``raw/var``),
varm (when every input's var is the collection's) and uns. obsp and varp (cell x cell
and gene x gene graphs, which a row shuffle would scramble), obsm DataFrames, and what
only some inputs hold, are dropped and named in one warning per input (see
:mod:`annserve.server.convert.plan` and :mod:`annserve.server.convert.carry`). Matrices are stored
narrow: column indices as uint16 up to 65,536 genes, and a group's values as uint16
when they are all integer counts up to 65,535 (lossless; ``--keep-dtype`` keeps the
input dtype). The collection's rows
are the groups' rows in order; the root attributes hold the manifest
(``attrs["annserve"]``, see :class:`Manifest`, written last) and annbatch's
``DatasetCollection`` marker, and the metadata is consolidated.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import zarr

from annserve.errors import AnnServeError, InvalidRequestError
from annserve.server.convert.manifest import Manifest, SourceEntry, var_names_sha256
from annserve.server.convert.passes import estimate_bytes, in_order, shuffled
from annserve.server.convert.plan import build_plan
from annserve.server.convert.source import SourceInfo, open_source
from annserve.server.convert.write import COMPRESSORS, write_manifest

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["DEFAULT_BUCKET_BYTES", "OutputExistsError", "convert"]

logger = logging.getLogger(__name__)

#: Default bound on the rows held in memory at once, bytes.
DEFAULT_BUCKET_BYTES = 256 << 20


class OutputExistsError(AnnServeError, FileExistsError):
    """The output of a conversion exists and overwriting was not asked for."""

    grpc_status = None  # raised by ``annserve convert`` only, never sent
    exit_code = 5


def convert(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    shuffle: bool = True,
    seed: int = 0,
    var_join: str = "outer",
    layers: Sequence[str] | None = None,
    obs_columns: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    compression: str = "lz4",
    keep_dtype: bool = False,
) -> Manifest:
    """Convert AnnData stores into one collection (see the module docstring for the layout).

    Every input is opened and checked before anything is written. The collection is
    built in a hidden temporary directory next to ``output`` (``.annserve-convert-*``,
    also holding the shuffle's spill files, about the uncompressed size of the data) and
    renamed to ``output`` once complete, so an interrupted conversion never leaves
    anything at ``output``.

    Parameters
    ----------
    inputs
        ``.h5ad`` files or AnnData zarr stores with CSR or dense X; cells keep their obs
        names, and the ``dataset`` column holds each input's file name (its full path
        where two inputs share a name).
    output
        Collection to create (a directory; ``.zarr`` suffix recommended).
    shuffle
        Write the cells in a uniformly random order drawn from ``seed``; False keeps
        input order.
    seed
        Seed of the shuffle, >= 0; the same inputs, seed and ``max_bucket_bytes`` give
        the same collection.
    var_join
        ``"outer"``: the union of the genes, in first-seen order (the first input's genes,
        then each later input's new genes); genes absent from an input are absent from
        its rows. ``"inner"``: the genes in every input, in the first input's order.
    layers
        Layers to carry besides X; each must exist in every input. None (default):
        every layer that all inputs hold (a layer only some inputs hold is dropped and
        named in their warnings); ``()``: none.
    obs_columns
        obs columns to carry; None for all columns of all inputs. Columns are joined as
        described in :mod:`annserve.server.convert.plan`; categoricals get the union
        of the categories.
    overwrite
        Replace an existing ``output`` (only after the new collection is complete).
    progress
        Show tqdm progress bars on stderr.
    compression
        Codec of X and layers: ``"lz4"`` (default, as annbatch), ``"zstd"`` (smallest) or
        ``"none"`` (about 2x the disk of LZ4, half the daemon's read CPU: the
        daemon's reads are bound by chunk decoding).
    keep_dtype
        Store X and layers values in the inputs' (common) dtype. False (default): in each
        group, a matrix whose values are all integers in ``[0, 65535]`` (raw counts, in
        any integer or float dtype wider than 2 bytes) is stored as uint16, losslessly:
        the values are unchanged, fewer bytes are read per value, and
        :func:`anndata.read_zarr` reads that group's X (or layer) back as uint16. Other
        values (e.g. normalised floats) keep their dtype, so groups may differ in dtype.
        Column indices are stored as uint16 up to 65,536 genes either way.
    max_bucket_bytes
        Bound on the rows held in memory at once, bytes (uncompressed; peak memory is
        about twice this plus the encoder's buffers).

    Returns
    -------
    The collection's manifest.

    Warns
    -----
    One ``logging`` warning per input that holds elements not carried, naming them
    (e.g. ``obsp/distances``, ``obsm/<a DataFrame>``, ``layers/<in one input only>``).

    Raises
    ------
    InvalidRequestError
        For bad arguments (an unknown ``var_join``, a negative seed, no inputs, an
        input given twice or equal to ``output``, a missing output directory).
    OutputExistsError
        If ``output`` exists and ``overwrite`` is False.
    StoreNotFoundError
        If an input does not exist.
    StoreFormatError
        If an input is not a readable AnnData store, its shapes disagree, its var names
        repeat, a requested layer or obs column is missing, or the inputs cannot be joined.
    OSError
        If writing fails (e.g. the disk is full).
    """
    paths, out = _check_arguments(
        inputs, output, seed, var_join, max_bucket_bytes, layers, obs_columns
    )
    if (out.exists() or out.is_symlink()) and not overwrite:
        msg = f"output exists: {out} (pass overwrite=True / --overwrite to replace it)"
        raise OutputExistsError(msg)
    sources = _validate(paths, None if layers is None else tuple(dict.fromkeys(layers)))
    if compression not in COMPRESSORS:
        msg = f"compression: {compression!r}; allowed {sorted(COMPRESSORS)}"
        raise InvalidRequestError(msg)
    plan = replace(
        build_plan(sources, var_join, None if obs_columns is None else list(obs_columns)),
        compression=compression,
        keep_dtype=bool(keep_dtype),
    )
    for source, dropped in zip(sources, plan.dropped, strict=True):
        if dropped:
            logger.warning(
                "%s: not carried into the collection: %s", source.path, ", ".join(dropped)
            )
    _warn_disk(out.parent, estimate_bytes(plan), shuffle)
    work = Path(tempfile.mkdtemp(prefix=".annserve-convert-", dir=out.parent))
    try:
        staging = work / "collection"
        root = zarr.open_group(staging, mode="w-", zarr_format=3)
        if shuffle:
            groups = shuffled(
                plan,
                root,
                work / "spill",
                seed=seed,
                max_bucket_bytes=max_bucket_bytes,
                progress=progress,
            )
        else:
            groups = in_order(plan, root, max_bucket_bytes=max_bucket_bytes, progress=progress)
        manifest = Manifest(
            tuple(groups),
            sum(g.n_obs for g in groups),
            plan.n_vars,
            var_names_sha256(plan.var.index),
            var_join,
            tuple(
                SourceEntry(str(s.path.absolute()), s.label, s.n_obs, s.size_bytes) for s in sources
            ),
            seed,
            shuffle,
            tuple(k.split("/", 1)[1] for k in plan.dtypes if k.startswith("layers/")),
            tuple(c.name for c in plan.columns),
        )
        write_manifest(staging, manifest)
        _commit(staging, out, work, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info(
        "wrote %s: %d cells x %d genes in %d groups",
        out,
        manifest.n_obs,
        manifest.n_vars,
        len(groups),
    )
    return manifest


def _check_arguments(
    inputs: Sequence[str | Path],
    output: str | Path,
    seed: int,
    var_join: str,
    max_bucket_bytes: int,
    layers: Sequence[str] | None,
    obs_columns: Sequence[str] | None,
) -> tuple[list[Path], Path]:
    paths = [Path(p) for p in inputs]
    out = Path(output)
    problems = []
    if not paths:
        problems.append("inputs: give at least one input")
    if var_join not in ("outer", "inner"):
        problems.append(f"var_join: {var_join!r}; allowed 'outer' or 'inner'")
    if isinstance(layers, str) or isinstance(obs_columns, str):
        problems.append("layers, obs_columns: give a sequence of names, not one string")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed: {seed!r}; must be an integer >= 0")
    if (
        isinstance(max_bucket_bytes, bool)
        or not isinstance(max_bucket_bytes, int)
        or max_bucket_bytes <= 0
    ):
        problems.append(f"max_bucket_bytes: {max_bucket_bytes!r}; must be an integer > 0")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) < len(resolved):
        problems.append("inputs: an input is given twice")
    if out.resolve() in resolved:
        problems.append(f"output: {out} is also an input")
    if not out.parent.is_dir():
        problems.append(f"output: directory {out.parent} does not exist")
    if problems:
        msg = "; ".join(problems)
        raise InvalidRequestError(msg)
    return paths, out


def _labels(paths: list[Path]) -> list[str]:
    """Each input's ``dataset`` label: its file name, or its path where names collide."""
    names = [p.name for p in paths]
    return [p.name if names.count(p.name) == 1 else str(p) for p in paths]


def _validate(paths: list[Path], layers: tuple[str, ...] | None) -> list[SourceInfo]:
    infos = []
    for path, label in zip(paths, _labels(paths), strict=True):
        with open_source(path, label, layers) as source:
            infos.append(source.info)
        logger.info("input %s: %d cells x %d genes", path, infos[-1].n_obs, infos[-1].n_vars)
    return infos


def _warn_disk(directory: Path, estimate: int, shuffle: bool) -> None:
    need = estimate * (2 if shuffle else 1)
    free = shutil.disk_usage(directory).free
    if free < need:
        logger.warning(
            "%s has %.1f GB free; the conversion may need up to %.1f GB",
            directory,
            free / 1e9,
            need / 1e9,
        )


def _commit(staging: Path, out: Path, work: Path, overwrite: bool) -> None:
    """Rename the finished collection to ``out``, moving an old one into ``work`` first."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            msg = f"output exists: {out} (it appeared during the conversion)"
            raise OutputExistsError(msg)
        os.rename(out, work / "replaced")
    os.rename(staging, out)
