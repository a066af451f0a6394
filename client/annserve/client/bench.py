"""``annserve bench ADDRESS``: check a deployment from a trainer host.

Streams N batches through :class:`~annserve.client.RemoteLoader` with the given
settings (a progress bar on stderr) and prints what a trainer would see: time to the
first batch, cells/s, MB/s of X as received (values and column indices once decoded,
what the loop gets) and the client's CPU time per cell (all of this process's
threads: decoding and gRPC). Exit codes: 0 measured, 1 the server failed the stream,
2 bad arguments, 3 no server answered.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from annserve.client.loader import RemoteLoader
from annserve.client.options import Connection, Output
from annserve.errors import AnnServeError, InvalidRequestError, ServerUnavailableError

if TYPE_CHECKING:
    from collections.abc import Sequence

EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``annserve bench``."""
    parser = argparse.ArgumentParser(
        prog="annserve bench",
        description="Stream batches from an annserve daemon and print cells/s, MB/s, "
        "first-batch time and client CPU per cell.",
    )
    parser.add_argument("address", help="host:port or unix:/path of the daemon")
    parser.add_argument("--batches", type=int, default=50, help="batches to stream (50)")
    parser.add_argument("--store", default="", help="store name (default: the server's first)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--preload-nchunks", type=int, default=256)
    parser.add_argument("--no-shuffle", action="store_true", help="store order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layer", default=None, help="serve this layer instead of X")
    parser.add_argument("--obs-keys", default="", help="comma-separated obs columns")
    parser.add_argument("--dense", action="store_true", help="X as dense tensors")
    parser.add_argument("--encoding", default="compact", choices=["compact", "raw"])
    parser.add_argument("--compression", default=None, choices=["zstd", "lz4", "blosc"])
    parser.add_argument("--token-file", type=Path, help="file whose first line is the token")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect timeout, s")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


def run(loader: RemoteLoader, batches: int, progress: bool = True) -> dict[str, Any]:
    """Stream up to ``batches`` batches (epochs follow one another) and measure them.

    Returns
    -------
    dict
        Keys ``batches``, ``cells``, ``seconds`` (wall time from the first request),
        ``first_batch_s``, ``cells_per_s``, ``mb_per_s`` (MB = 10**6 bytes of X's values
        and column indices received) and ``cpu_us_per_cell`` (this process's CPU time,
        all threads, per cell, microseconds).
    """
    cells = nbytes = done = 0
    bar = tqdm(total=batches, unit="batch", disable=not progress, file=sys.stderr)
    started, cpu_started = time.perf_counter(), time.process_time()
    first = None
    while done < batches:
        for batch in loader:
            if first is None:
                first = time.perf_counter() - started
            x = batch["X"]
            cells += int(x.shape[0])
            nbytes += _x_bytes(x)
            done += 1
            bar.update()
            if done == batches:
                break
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    bar.close()
    return {
        "batches": done,
        "cells": cells,
        "seconds": round(seconds, 3),
        "first_batch_s": round(first or 0.0, 3),
        "cells_per_s": round(cells / seconds, 1),
        "mb_per_s": round(nbytes / seconds / 1e6, 2),
        "cpu_us_per_cell": round(cpu / max(cells, 1) * 1e6, 2),
    }


def _x_bytes(x: Any) -> int:
    """Bytes of a batch's X: values and column indices (sparse) or the dense array."""
    if isinstance(x, torch.Tensor) and x.layout == torch.sparse_csr:
        parts = (x.values(), x.col_indices())
        return sum(p.numel() * p.element_size() for p in parts)
    return int(x.numel() * x.element_size())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``annserve bench``; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.batches < 1:
            msg = f"--batches must be >= 1, got {args.batches}"
            raise InvalidRequestError(msg)
        token = args.token_file.read_text().split()[0] if args.token_file else None
        loader = RemoteLoader(
            args.address,
            store=args.store,
            layer=args.layer,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            preload_nchunks=args.preload_nchunks,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            obs_keys=[k for k in args.obs_keys.split(",") if k],
            output=Output(to_dense=args.dense),
            connection=Connection(
                timeout=args.timeout,
                encoding=args.encoding,
                compression=args.compression,
                token=token,
            ),
        )
        with warnings.catch_warnings():  # once per process, on the first sparse batch
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            result = run(loader, args.batches, progress=not args.json)
    except ServerUnavailableError as e:
        print(f"annserve bench: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (InvalidRequestError, OSError) as e:
        print(f"annserve bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AnnServeError as e:
        print(f"annserve bench: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    result = {"address": args.address, "n_obs": loader.n_obs, "n_vars": loader.n_vars, **result}
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.address}: {loader.n_obs:,} cells x {loader.n_vars:,} genes, batch "
        f"{args.batch_size:,}, {'shuffled' if not args.no_shuffle else 'store order'}"
    )
    print(f"  batches       {result['batches']:,} ({result['cells']:,} cells)")
    print(f"  first batch   {result['first_batch_s']:.3f} s")
    print(f"  cells/s       {result['cells_per_s']:,.0f}")
    print(f"  MB/s          {result['mb_per_s']:,.1f} (X values + indices as received)")
    print(f"  client CPU    {result['cpu_us_per_cell']:.2f} us/cell")
    return 0


if __name__ == "__main__":
    sys.exit(main())
