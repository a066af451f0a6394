"""The ``annserve`` command: run the daemon in the foreground.

Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 1 when a worker of
``--workers N`` had to be killed at shutdown, 2 for bad arguments, 3 when a store
cannot be opened, 4 when an address cannot be bound, 5 when a TLS or token file
cannot be read. Every flag ``--some-flag`` also reads its
default from the environment variable ``ANNSERVE_SOME_FLAG``.
``annserve convert ...`` runs :func:`annserve.server.convert.convert_main` instead,
``annserve inspect STORE`` :func:`annserve.server.rpc.inspection.inspect_main`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import zarr

from annserve.errors import AnnServeError, InvalidRequestError, StoreNotFoundError
from annserve.memory import avoid_huge_pages, retain_freed_memory
from annserve.server.convert import convert_main
from annserve.server.io.cache import DEFAULT_MAX_GB, ChunkCache, caching, default_cache_bytes
from annserve.server.io.ranges import ZARRS_PIPELINE
from annserve.server.io.store import Store, open_store
from annserve.server.plan.limits import Limits
from annserve.server.rpc.app import KEEPALIVE_S, build_server
from annserve.server.rpc.inspection import inspect_main
from annserve.server.rpc.logs import configure_logging
from annserve.server.rpc.metrics import serve_metrics
from annserve.server.rpc.security import (
    MAX_UNAUTHENTICATED_CALLS,
    TLSConfig,
    is_loopback,
    read_tokens,
)
from annserve.server.rpc.service import STALL_TIMEOUT_S
from annserve.server.rpc.workers import supervise

if TYPE_CHECKING:
    from annserve.server.rpc.workers import Worker

logger = logging.getLogger("annserve")

EXIT_BIND = 4
EXIT_SECURITY = 5

#: Seconds between the main thread's looks at SIGTERM/SIGINT. The kernel may hand a
#: process-directed signal to any thread; Python runs the handler only once the main
#: thread next executes bytecode, which an untimed ``Event.wait`` never does (a daemon
#: under load stayed SERVING after SIGTERM until killed).
SIGNAL_POLL_S = 0.2

#: Prefix of the environment variables giving flag defaults.
ENV_PREFIX = "ANNSERVE_"


def env_var(flag: str) -> str:
    """Return the environment variable of a flag: ``--max-streams`` -> ``ANNSERVE_MAX_STREAMS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _env(flag: str, default: object = None) -> object:
    # a string default is converted by the argument's type, as if given on the command line
    return os.environ.get(env_var(flag), default)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``annserve``."""
    parser = argparse.ArgumentParser(
        prog="annserve",
        description="Serve AnnData minibatches to remote trainers over gRPC.",
        epilog="annserve convert --help: convert AnnData files into a shuffled collection. "
        "annserve inspect STORE: what would be served and how it is read. "
        "annserve bench ADDRESS: measure a running daemon from a trainer host.",
    )
    parser.add_argument(
        "--store",
        action="append",
        metavar="[NAME=]PATH",
        type=store_spec,
        help=".h5ad file, AnnData zarr store or collection, opened read-only; "
        "repeat to serve several, clients choose by NAME (default: the "
        "file name without suffix; the first store is the default). "
        "Env ANNSERVE_STORE: specs separated by commas",
    )
    parser.add_argument(
        "--host", default=_env("--host", "127.0.0.1"), help="address to bind (default %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=_env("--port", 50051),
        help="port to bind; 0 picks a free one (default %(default)s)",
    )
    parser.add_argument(
        "--unix",
        metavar="PATH",
        default=_env("--unix"),
        help="also listen on this unix domain socket (same-host trainers connect "
        "with address unix:PATH; faster than TCP loopback; no TLS)",
    )
    parser.add_argument(
        "--no-shared-memory",
        action="store_true",
        default=_env("--no-shared-memory", "0") not in ("0", "false", "no", ""),
        help="serve plain gRPC streams only: without it, a daemon listening on --unix PATH "
        "also streams batches to same-host trainers through shared memory (a side socket "
        "at PATH.shm hands out memfd slots; gRPC carries only headers)",
    )
    parser.add_argument(
        "--bulk-port",
        type=int,
        default=_env("--bulk-port", 0),
        help="TCP port of the bulk channel: remote trainers get each frame on a plain TCP "
        "connection (gRPC carries only headers), which spares their CPU Python gRPC's "
        "receive copies; 0 picks a free one, announced by DescribeStore; worker i of "
        "--workers binds PORT + i (default %(default)s). Never with --tls-cert",
    )
    parser.add_argument(
        "--no-bulk",
        action="store_true",
        default=_env("--no-bulk", "0") not in ("0", "false", "no", ""),
        help="offer no bulk channel: remote trainers get frames inside gRPC messages",
    )
    parser.add_argument(
        "--no-shared-reads",
        action="store_true",
        default=_env("--no-shared-reads", "0") not in ("0", "false", "no", ""),
        help="read every preload buffer per stream: without it, streams that read the same "
        "buffers (same store, genes, sampling and epoch: a sweep's trainers) read each once",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=_env("--workers", 1),
        metavar="N",
        help="processes serving the TCP port together (SO_REUSEPORT), each with all "
        "cores' worth of threads; 0: one per CPU; limits, metrics and drain stay "
        "daemon-wide; only the first listens on --unix (default %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=_env("--grace", 5.0),
        metavar="SECONDS",
        help="seconds in-flight streams get to finish on SIGTERM/SIGINT; then "
        "they end with UNAVAILABLE (default %(default)s)",
    )
    parser.add_argument(
        "--zarr-pipeline",
        choices=["zarrs", "zarr-python"],
        default=_env("--zarr-pipeline", "zarrs"),
        help="codec pipeline decoding zarr chunks (default %(default)s: the Rust "
        "zarrs pipeline, several times faster)",
    )
    parser.add_argument(
        "--cache-gb",
        type=float,
        default=_env("--cache-gb"),
        metavar="GB",
        help="bound of the decoded-chunk cache of compressed CSR stores, GB (10^9 "
        "bytes), all stores together; 0 disables it (default: a quarter of the "
        f"memory available at start, at most {DEFAULT_MAX_GB:g} GB, shared by the workers)",
    )
    parser.add_argument(
        "--log-level",
        default=_env("--log-level", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
    )
    parser.add_argument(
        "--log-format",
        default=_env("--log-format", "text"),
        choices=["text", "json"],
        help="text lines, or one JSON object per line with a stream_id field "
        "on stream records (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=_env("--metrics-port"),
        help="serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a "
        "free port (default: off)",
    )
    parser.add_argument(
        "--metrics-host",
        default=_env("--metrics-host"),
        help="address of the metrics endpoint (default: --host)",
    )
    limits = Limits()
    parser.add_argument(
        "--max-streams",
        type=int,
        default=_env("--max-streams", limits.max_streams),
        help="concurrent StreamBatches calls; more get RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=_env("--max-batch-size", limits.max_batch_size),
        help="largest batch_size a client may ask for, rows (default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env("--max-message-bytes", limits.max_message_bytes),
        help="largest frame sent, bytes; frames are ~2 MB, so keep it >= 4 MiB "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--stream-memory-mb",
        type=float,
        default=_env("--stream-memory-mb", limits.stream_memory_mb),
        help="per-stream budget: refuse requests whose preload buffer "
        "(chunk_size x preload_nchunks rows) would need more, MB "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-unauthenticated-calls",
        type=int,
        default=_env("--max-unauthenticated-calls", MAX_UNAUTHENTICATED_CALLS),
        help="concurrent calls per token-exempt method (health Check, Watch); more get "
        "RESOURCE_EXHAUSTED (default %(default)s)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=_env("--stall-timeout", STALL_TIMEOUT_S),
        metavar="SECONDS",
        help="end a stream with DEADLINE_EXCEEDED when its client has taken no frame "
        "for this long, freeing its --max-streams slot (default %(default)s)",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=_env("--keepalive", KEEPALIVE_S),
        metavar="SECONDS",
        help="ping each connection this often; one whose peer does not answer within "
        "10 s is closed and its streams end (default %(default)s)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=_env("--tls-cert"),
        metavar="PEM",
        help="serve TCP over TLS with this certificate chain (with --tls-key)",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=_env("--tls-key"),
        metavar="PEM",
        help="private key of --tls-cert",
    )
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=_env("--tls-client-ca"),
        metavar="PEM",
        help="require client certificates signed by these CAs (mutual TLS)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=_env("--token-file"),
        metavar="PATH",
        help="require 'authorization: Bearer TOKEN' metadata, TOKEN one of the "
        "file's non-empty lines (health checks are exempt)",
    )
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


def chunk_cache(args: argparse.Namespace) -> ChunkCache | None:
    """Return the decoded-chunk cache ``--cache-gb`` asks for, None when it is 0.

    Without ``--cache-gb``, :func:`~annserve.server.io.cache.default_cache_bytes`
    shared by the processes of ``--workers`` (each holds its own cache).
    """
    if args.cache_gb is not None:
        max_bytes = int(args.cache_gb * 1e9)
    else:
        processes = getattr(args, "workers", 1) or os.cpu_count() or 1
        max_bytes = default_cache_bytes() // processes
    return ChunkCache(max_bytes) if max_bytes > 0 else None


def _log_cache(cache: ChunkCache | None) -> None:
    """Log the cache's bound (once the stores opened: a failure's stderr stays one line)."""
    if cache is None:
        logger.info("decoded-chunk cache off (--cache-gb 0)")
    else:
        logger.info(
            "decoded-chunk cache of compressed CSR arrays: up to %.2f GB", cache.max_bytes / 1e9
        )


def _open_stores(specs: list[tuple[str, Path]]) -> dict[str, Store]:
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        msg = f"store names must be unique, got {names}"
        raise InvalidRequestError(msg)
    return {name: open_store(path) for name, path in specs}


def _parse(argv: list[str]) -> tuple[argparse.Namespace, Limits]:
    """Parse and cross-check the arguments; exit 2 (argparse) on bad ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.store:
        specs = [spec for spec in os.environ.get(env_var("--store"), "").split(",") if spec]
        if not specs:
            parser.error("--store is required (or the environment variable ANNSERVE_STORE)")
        try:
            args.store = [store_spec(spec) for spec in specs]
        except argparse.ArgumentTypeError as e:
            parser.error(f"ANNSERVE_STORE: {e}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (0: one per CPU), got {args.workers}")
    if args.cache_gb is not None and not 0 <= args.cache_gb < float("inf"):
        parser.error(f"--cache-gb must be a number of GB >= 0, got {args.cache_gb}")
    if args.max_unauthenticated_calls < 1:
        parser.error(
            f"--max-unauthenticated-calls must be >= 1, got {args.max_unauthenticated_calls}"
        )
    for flag, seconds in (("--stall-timeout", args.stall_timeout), ("--keepalive", args.keepalive)):
        if not seconds > 0:
            parser.error(f"{flag} must be > 0 seconds, got {seconds}")
    try:
        limits = Limits(
            max_streams=args.max_streams,
            max_batch_size=args.max_batch_size,
            max_message_bytes=args.max_message_bytes,
            stream_memory_mb=args.stream_memory_mb,
        )
    except ValueError as e:
        parser.error(str(e))
    return args, limits


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT, or ``annserve convert|inspect ...``; return the code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["convert"]:
        return convert_main(argv[1:])
    if argv[:1] == ["inspect"]:
        return inspect_main(argv[1:])
    args, limits = _parse(argv)
    configure_logging(args.log_level, args.log_format)
    if args.workers != 1:
        return supervise(args, limits)
    return serve(args, limits)


def _bulk_port(args: argparse.Namespace, worker: Worker | None) -> int | None:
    """Return the bulk channel's port of this process (``--bulk-port``), None for none."""
    if args.no_bulk:
        return None
    if args.bulk_port and worker is not None:
        return args.bulk_port + worker.index
    return args.bulk_port


def serve(args: argparse.Namespace, limits: Limits, worker: Worker | None = None) -> int:
    """Serve until SIGTERM or SIGINT in this process; return the exit code.

    Parameters
    ----------
    args, limits
        The parsed command line.
    worker
        This process is one of the workers of ``--workers N``: it binds the port the
        supervisor resolved with ``SO_REUSEPORT``, counts streams and metrics with the
        other workers and reports to the supervisor, which logs the address and serves
        ``/metrics``. Only worker 0 listens on ``--unix`` and logs the address warnings.
    """
    retain_freed_memory()  # frames and preload buffers reuse freed memory: no page faults
    avoid_huge_pages()  # first touches of new memory (the chunk cache's) stay cheap
    if args.zarr_pipeline == "zarrs":
        zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE})
    try:
        tls = (
            TLSConfig.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
            if args.tls_cert is not None
            else None
        )
        tokens = read_tokens(args.token_file) if args.token_file is not None else None
    except (OSError, ValueError) as e:
        print(f"annserve: {e}", file=sys.stderr)
        return EXIT_SECURITY
    try:
        cache = chunk_cache(args)
        with caching(cache):
            stores = _open_stores(args.store)
    except AnnServeError as e:
        print(f"annserve: {e}", file=sys.stderr)
        # any store that cannot be served as configured (duplicate names too) is the
        # "store missing or unreadable" exit code, whatever the error's own code
        return StoreNotFoundError.exit_code
    _log_cache(cache)
    first = worker is None or worker.index == 0
    if first and not is_loopback(args.host) and tls is None and tokens is None:
        logger.warning(
            "binding %s without TLS or a token: anyone who can reach this address "
            "can read the stores (set --tls-cert/--tls-key and/or --token-file)",
            args.host,
        )
    port = args.port if worker is None else worker.port
    unix = args.unix if first else None
    addresses = [f"{args.host}:{port}"] + ([f"unix:{unix}"] if unix else [])
    try:
        server = build_server(
            stores,
            addresses,
            limits=limits,
            tls=tls,
            tokens=tokens,
            stall_timeout=args.stall_timeout,
            keepalive=args.keepalive,
            max_unauthenticated_calls=args.max_unauthenticated_calls,
            metrics=worker.metrics() if worker is not None else None,
            reuse_port=worker is not None,
            slots=worker.slots if worker is not None else None,
            shared_memory=not args.no_shared_memory,
            shared_reads=not args.no_shared_reads,
            bulk_port=_bulk_port(args, worker),
        )
    except OSError as e:
        print(f"annserve: {e}", file=sys.stderr)
        return EXIT_BIND
    if cache is not None:
        server.metrics.registry.register(cache)
    metrics_http = None
    if args.metrics_port is not None and worker is None:
        metrics_host = args.metrics_host or args.host
        try:
            metrics_http = serve_metrics(server.metrics, metrics_host, args.metrics_port)
        except OSError as e:
            server.server.stop(None)
            print(
                f"annserve: cannot bind metrics on {metrics_host}:{args.metrics_port}: {e}",
                file=sys.stderr,
            )
            return EXIT_BIND
        logger.info("metrics on http://%s:%d/metrics", metrics_host, metrics_http.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    if worker is None:
        log_listening(args, server.ports[0])
    else:
        worker.serving(server, stop)
    # what startup loaded (stores' obs/var, zarr, anndata, gRPC) lives as long as the daemon:
    # keep it out of the cyclic GC, whose full passes over it cost ~50 ms per epoch streamed
    gc.freeze()
    while not stop.wait(SIGNAL_POLL_S):
        continue
    logger.info(
        "shutting down: health NOT_SERVING, no new streams; %d in flight get %.1f s",
        server.service.open_streams(),
        args.grace,
    )
    finished = server.shutdown(args.grace)
    if metrics_http is not None:
        metrics_http.close()
    logger.info(
        "stopped (%s)",
        "all streams finished"
        if finished
        else "streams still running after the grace ended with UNAVAILABLE",
    )
    return 0


def log_listening(args: argparse.Namespace, port: int) -> None:
    """Log the daemon's addresses: ``listening on HOST:PORT`` (what scripts wait for)."""
    logger.info(
        "listening on %s:%d%s%s",
        args.host,
        port,
        " (TLS, client certificates required)"
        if args.tls_client_ca is not None
        else " (TLS)"
        if args.tls_cert is not None
        else "",
        ", bearer token required" if args.token_file is not None else "",
    )
    if args.unix:
        logger.info("listening on unix:%s", args.unix)


if __name__ == "__main__":
    sys.exit(main())
