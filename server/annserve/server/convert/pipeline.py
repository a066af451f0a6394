"""``annserve convert``: turn AnnData files into one shuffled, sharded zarr collection.

::

    annserve convert a.h5ad b.h5ad ... -o collection.zarr [--shuffle/--no-shuffle]
        [--seed N] [--var-join outer|inner] [--layers counts,...] [--obs-columns a,b,...]
        [--overwrite] [--compression lz4|zstd|none] [--keep-dtype] [--max-bucket-mb MB]
        [--no-progress]

The collection is a zarr v3 group whose children ``dataset_0``, ``dataset_1``, ... are
AnnData zarr groups (each readable by :func:`anndata.read_zarr`) with CSR X (and the
requested layers) in the joined gene space, the obs columns plus a categorical
``dataset`` column naming each cell's input, and the same var. Matrices are stored
narrow: column indices as uint16 up to 65,536 genes, and a group's values as uint16
when they are all integer counts up to 65,535 (lossless; ``--keep-dtype`` keeps the
input dtype). The collection's rows
are the groups' rows in order; the root attributes hold the manifest
(``attrs["annserve"]``, see :class:`Manifest`, written last) and annbatch's
``DatasetCollection`` marker, and the metadata is consolidated.

Exit codes: 0 converted; 1 the conversion failed while writing (e.g. disk full; the
output is left untouched); 2 bad arguments; 3 an input is missing or not a readable
AnnData store, or the inputs cannot be joined (the message names the file); 5 the output
exists and ``--overwrite`` was not given; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import zarr

from annserve.errors import (
    AnnServeError,
    InvalidRequestError,
    StoreFormatError,
    StoreNotFoundError,
)
from annserve.server.convert.manifest import (
    GroupEntry,
    Manifest,
    SourceEntry,
    read_manifest,
    var_names_sha256,
)
from annserve.server.convert.passes import estimate_bytes, in_order, shuffled
from annserve.server.convert.plan import build_plan
from annserve.server.convert.source import SourceInfo, open_source
from annserve.server.convert.write import COMPRESSORS, write_manifest

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "GroupEntry",
    "Manifest",
    "OutputExistsError",
    "SourceEntry",
    "convert",
    "convert_main",
    "read_manifest",
]

logger = logging.getLogger(__name__)

#: Default bound on the rows held in memory at once, bytes.
DEFAULT_BUCKET_BYTES = 256 << 20
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_EXISTS = 5
EXIT_INTERRUPTED = 130


class OutputExistsError(AnnServeError, FileExistsError):
    """The output of a conversion exists and overwriting was not asked for."""


def convert(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    shuffle: bool = True,
    seed: int = 0,
    var_join: str = "outer",
    layers: Sequence[str] = (),
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
        Layers to carry besides X; each must exist in every input.
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
    layers = tuple(dict.fromkeys(layers))
    sources = _validate(paths, layers)
    if compression not in COMPRESSORS:
        msg = f"compression: {compression!r}; allowed {sorted(COMPRESSORS)}"
        raise InvalidRequestError(msg)
    plan = replace(
        build_plan(sources, var_join, None if obs_columns is None else list(obs_columns)),
        compression=compression,
        keep_dtype=bool(keep_dtype),
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
            layers,
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
    layers: Sequence[str],
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


def _validate(paths: list[Path], layers: tuple[str, ...]) -> list[SourceInfo]:
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


def build_convert_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``annserve convert``."""
    parser = argparse.ArgumentParser(
        prog="annserve convert",
        description="Convert AnnData stores into one shuffled, sharded zarr collection.",
        epilog="Exit codes: 0 ok, 1 write failed, 2 bad arguments, 3 bad input store, "
        "5 output exists.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help=".h5ad files or AnnData zarr stores (CSR or dense X)",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="collection to create (e.g. collection.zarr)",
    )
    parser.add_argument(
        "--shuffle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shuffle all cells uniformly (default); --no-shuffle keeps input order",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument(
        "--var-join",
        choices=["outer", "inner"],
        default="outer",
        help="union (default) or intersection of the genes",
    )
    parser.add_argument(
        "--layers",
        type=_comma_list,
        default=[],
        metavar="A,B",
        help="layers to carry besides X (each must exist in every input)",
    )
    parser.add_argument(
        "--obs-columns",
        type=_comma_list,
        default=None,
        metavar="A,B",
        help="obs columns to carry (default: all)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--compression",
        choices=sorted(COMPRESSORS),
        default="lz4",
        help="codec of X and layers (default lz4; none: ~2x the disk, half the daemon's read CPU)",
    )
    parser.add_argument(
        "--keep-dtype",
        action="store_true",
        help="store values in the input dtype; default: integer counts up "
        "to 65,535 are stored as uint16, losslessly",
    )
    parser.add_argument(
        "--max-bucket-mb",
        type=int,
        default=DEFAULT_BUCKET_BYTES >> 20,
        metavar="MB",
        help="rows held in memory at once, MB (default %(default)s; peak memory about twice this)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    return parser


def _comma_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def convert_main(argv: list[str] | None = None) -> int:
    """Run ``annserve convert`` with the given arguments; return the exit code."""
    args = build_convert_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        manifest = convert(
            args.inputs,
            args.output,
            shuffle=args.shuffle,
            seed=args.seed,
            var_join=args.var_join,
            layers=args.layers,
            obs_columns=args.obs_columns,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            max_bucket_bytes=args.max_bucket_mb << 20,
            compression=args.compression,
            keep_dtype=args.keep_dtype,
        )
    except KeyboardInterrupt:
        print("annserve convert: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        InvalidRequestError,
        OutputExistsError,
        StoreFormatError,
        StoreNotFoundError,
        OSError,
    ) as e:
        print(f"annserve convert: {e}", file=sys.stderr)
        return _exit_code(e)
    print(
        f"wrote {args.output}: {manifest.n_obs} cells x {manifest.n_vars} genes in "
        f"{len(manifest.groups)} groups"
    )
    return 0


def _exit_code(error: Exception) -> int:
    if isinstance(error, InvalidRequestError):
        return EXIT_USAGE
    if isinstance(error, OutputExistsError):
        return EXIT_EXISTS
    if isinstance(error, StoreFormatError | StoreNotFoundError):
        return EXIT_INPUT
    return EXIT_FAILED
