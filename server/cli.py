"""The ``annserve`` command: run the daemon in the foreground.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 2 for bad arguments,
3 when a store cannot be opened, 4 when the address cannot be bound.
``annserve convert ...`` runs :func:`annserve.server.convert.convert_main` instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import zarr

from annserve.errors import AnnServeError, InvalidRequestError
from annserve.server.app import create_server
from annserve.server.convert import convert_main
from annserve.server.ranges import ZARRS_PIPELINE
from annserve.server.store import Store, open_store

logger = logging.getLogger("annserve")

EXIT_STORE = 3
EXIT_BIND = 4


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``annserve``."""
    parser = argparse.ArgumentParser(
        prog="annserve", description="Serve AnnData minibatches to remote trainers over gRPC.",
        epilog="annserve convert --help: convert AnnData files into a shuffled collection.")
    parser.add_argument("--store", required=True, action="append", metavar="[NAME=]PATH",
                        type=store_spec,
                        help=".h5ad file, AnnData zarr store or collection, opened read-only; "
                             "repeat to serve several, clients choose by NAME (default: the "
                             "file name without suffix; the first store is the default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=50051,
                        help="port to bind; 0 picks a free one (default %(default)s)")
    parser.add_argument("--unix", metavar="PATH",
                        help="also listen on this unix domain socket (same-host trainers connect "
                             "with address unix:PATH; faster than TCP loopback)")
    parser.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                        help="seconds in-flight streams get on shutdown (default %(default)s)")
    parser.add_argument("--zarr-pipeline", choices=["zarrs", "zarr-python"], default="zarrs",
                        help="codec pipeline decoding zarr chunks (default %(default)s: the Rust "
                             "zarrs pipeline, several times faster)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def store_spec(spec: str) -> tuple[str, Path]:
    """Parse ``--store [NAME=]PATH`` into ``(name, path)``."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name:
        return Path(spec).stem, Path(spec)
    if not name:
        msg = f"empty store name in {spec!r}"
        raise argparse.ArgumentTypeError(msg)
    return name, Path(path)


def _open_stores(specs: list[tuple[str, Path]]) -> dict[str, Store]:
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        msg = f"store names must be unique, got {names}"
        raise InvalidRequestError(msg)
    return {name: open_store(path) for name, path in specs}


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM or SIGINT, or ``annserve convert ...``; return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.zarr_pipeline == "zarrs":
        zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE})
    try:
        stores = _open_stores(args.store)
    except AnnServeError as e:
        print(f"annserve: {e}", file=sys.stderr)
        return EXIT_STORE
    addresses = [f"{args.host}:{args.port}"] + ([f"unix:{args.unix}"] if args.unix else [])
    try:
        server, ports = create_server(stores, addresses)
    except OSError as e:
        print(f"annserve: {e}", file=sys.stderr)
        return EXIT_BIND
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    logger.info("listening on %s:%d", args.host, ports[0])
    if args.unix:
        logger.info("listening on unix:%s", args.unix)
    stop.wait()
    logger.info("shutting down; in-flight streams get %.1f s", args.grace)
    server.stop(args.grace).wait()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
