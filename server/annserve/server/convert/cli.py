"""``annserve convert``: the command line of :func:`~annserve.server.convert.convert`.

::

    annserve convert a.h5ad b.h5ad ... -o collection.zarr [--shuffle/--no-shuffle]
        [--seed N] [--var-join outer|inner] [--layers counts,...] [--obs-columns a,b,...]
        [--overwrite] [--compression lz4|zstd|none] [--keep-dtype] [--max-bucket-mb MB]
        [--no-progress]

Exit codes: 0 converted; 1 the conversion failed while writing (e.g. disk full; the
output is left untouched); 2 bad arguments; 3 an input is missing or not a readable
AnnData store, or the inputs cannot be joined (the message names the file); 5 the output
exists and ``--overwrite`` was not given; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from annserve.errors import (
    AnnServeError,
    InvalidRequestError,
    StoreFormatError,
    StoreNotFoundError,
)
from annserve.server.convert.pipeline import DEFAULT_BUCKET_BYTES, OutputExistsError, convert
from annserve.server.convert.write import COMPRESSORS

__all__ = ["build_convert_parser", "convert_main"]

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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
        default=None,
        metavar="A,B",
        help="layers to carry besides X (each must exist in every input); default: every "
        "layer all inputs hold; --layers '' carries none",
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
    return error.exit_code if isinstance(error, AnnServeError) else EXIT_FAILED
