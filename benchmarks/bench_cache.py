"""The decoded-chunk cache (``annserve --cache-gb``) on annbatch's own LZ4 collection, per epoch.

Rows, each repetition in fresh processes (a fresh daemon: its cache starts empty):

- ``annserve TCP, cache on``: ``RemoteLoader`` over loopback TCP streaming epochs 1, 2,
  3 from one daemon serving annbatch's collection as is, with its default cache;
- ``annserve TCP, --cache-gb 0``: the same, cache off;
- ``annbatch in-process``: annbatch's ``Loader`` on the same collection (epoch 1 in a
  fresh process; epochs 2 and 3 after one and two unmeasured epochs), when its
  environment exists (see README.md).

Columns per epoch: cells/s (from asking for the first batch to having consumed the
last: summing each batch's values), trainer-process CPU µs/cell, daemon CPU µs/cell (its
CPU over that epoch). Repetitions interleave the rows (order rotated each round);
every figure is a median.

Example
-------
    python benchmarks/bench_cache.py --atlas /tmp/atlas50k.zarr \\
        --collection /tmp/atlas50k.annbatch.zarr --reps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _daemon import (
    Daemon,
    add_loader_args,
    batch_sums,
    loader_flags,
    passive_env,
    remote_loader,
    run_json,
)
from _measure import cpu_seconds, process_cpu_seconds

HERE = Path(__file__).resolve().parent
ANNBATCH_PYTHON = HERE / ".venv-annbatch" / "bin" / "python"
EPOCHS = 3


def client(args: argparse.Namespace) -> dict[str, Any]:
    """Stream ``EPOCHS`` epochs through ``RemoteLoader``; per epoch: seconds, CPU, cells."""
    import warnings

    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)
    loader = remote_loader(args, seed=0)
    epochs = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        cpu0, server0 = cpu_seconds(), process_cpu_seconds(args.server_pid)
        t0 = time.perf_counter()
        cells, checksum = 0, 0.0
        for rows, total in batch_sums(loader):
            cells, checksum = cells + rows, checksum + total
        seconds = time.perf_counter() - t0
        epochs.append(
            {
                "cells": cells,
                "seconds": seconds,
                "cpu_s": cpu_seconds() - cpu0,
                "server_cpu_s": process_cpu_seconds(args.server_pid) - server0,
                "checksum": checksum,
            }
        )
    return {"epochs": epochs}


def remote_rep(args: argparse.Namespace, cache_gb: str | None) -> list[dict[str, Any]]:
    """Epochs 1..3 of one trainer on a fresh daemon (``--cache-gb cache_gb`` unless None)."""
    flags = ["--zarr-pipeline", "zarrs", *(["--cache-gb", cache_gb] if cache_gb else [])]
    daemon = Daemon(args.collection, flags, env=passive_env(), timeout=120.0)
    try:
        cmd = [sys.executable, __file__, "client", "--address", daemon.address]
        cmd += ["--server-pid", str(daemon.proc.pid), *loader_flags(args)]
        epochs = run_json(cmd)["epochs"]
        for e in epochs:
            e["server_rss_mb"] = daemon.memory_mb("VmRSS")
        return epochs
    finally:
        daemon.stop()


def annbatch_rep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Epochs 1..3 of annbatch, each in a fresh process after 0, 1, 2 unmeasured epochs."""
    out = []
    for warm in range(EPOCHS):
        cmd = [str(args.annbatch_python), str(HERE / "annbatch_worker.py"), "run"]
        cmd += ["--collection", str(args.collection), "--warmup-epochs", str(warm)]
        r = run_json([*cmd, *loader_flags(args)])
        out.append({k: r[k] for k in ("cells", "seconds", "cpu_s", "checksum")})
    return out


def prepare(args: argparse.Namespace) -> None:
    """Make the atlas and annbatch's collection of it when absent."""
    if not args.atlas.exists():
        print(f"making {args.atlas} ({args.n_obs} cells) ...", flush=True)
        subprocess.run(
            [sys.executable, str(HERE / "make_atlas.py"), "--out", str(args.atlas)]
            + ["--n-obs", str(args.n_obs)],
            check=True,
        )
    if not args.collection.exists():
        if not args.annbatch_python.exists():
            msg = f"no annbatch environment at {args.annbatch_python} to build {args.collection}"
            raise SystemExit(msg)
        print(f"building annbatch's collection {args.collection} ...", flush=True)
        cmd = [str(args.annbatch_python), str(HERE / "annbatch_worker.py"), "prepare"]
        run_json(cmd + ["--store", str(args.atlas), "--collection", str(args.collection)])


def median(reps: list[list[dict[str, Any]]], epoch: int, key: str) -> float:
    return statistics.median(r[epoch][key] for r in reps)


def report(results: dict[str, list[list[dict[str, Any]]]], args: argparse.Namespace) -> None:
    annbatch = results.get("annbatch in-process (annbatch 0.3.1)")
    print(
        f"\nstore: {args.collection} (annbatch DatasetCollection.add_adatas of {args.atlas}: "
        "Blosc LZ4, sharded), served as is"
    )
    print(
        f"batch {args.batch_size}, chunk {args.chunk_size} x preload {args.preload_nchunks}, "
        f"shuffled, torch CSR out; medians of {args.reps} interleaved repetitions\n"
    )
    head = (
        "| row | store | epoch | cells/s | x annbatch | trainer CPU µs/cell "
        "| daemon CPU µs/cell | daemon RSS MiB |"
    )
    print(head)
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for label, reps in results.items():
        if not reps:
            continue
        for e in range(EPOCHS):
            cells = median(reps, e, "cells")
            rate = statistics.median(r[e]["cells"] / r[e]["seconds"] for r in reps)
            ref = (
                statistics.median(r[e]["cells"] / r[e]["seconds"] for r in annbatch)
                if annbatch
                else float("nan")
            )
            cpu = median(reps, e, "cpu_s") / cells * 1e6
            server = (
                f"{median(reps, e, 'server_cpu_s') / cells * 1e6:.1f}"
                if "server_cpu_s" in reps[0][e]
                else "–"
            )
            rss = (
                f"{median(reps, e, 'server_rss_mb'):,.0f}" if "server_rss_mb" in reps[0][e] else "–"
            )
            print(
                f"| {label} | {args.collection.name} | {e + 1} | {rate / 1e3:.1f}k "
                f"| {rate / ref:.2f} | {cpu:.1f} | {server} | {rss} |"
            )
    sums = {round(e["checksum"] / 1e6) for reps in results.values() for r in reps for e in r}
    print(f"\nepoch checksums (10^6 units) agree across rows and epochs: {len(sums) == 1} {sums}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser("client", help="(internal) one repetition's client")
    c.add_argument("--address", required=True)
    c.add_argument("--server-pid", type=int, required=True)
    for q in (p, c):
        add_loader_args(q)
    p.add_argument("--atlas", type=Path, default=Path("/tmp/atlas50k.zarr"))
    p.add_argument("--n-obs", type=int, default=50_000, help="cells of a new atlas")
    p.add_argument("--collection", type=Path, default=Path("/tmp/atlas50k.annbatch.zarr"))
    p.add_argument("--annbatch-python", type=Path, default=ANNBATCH_PYTHON)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-annbatch", action="store_true", help="leave out the annbatch row")
    p.add_argument("--json", type=Path, help="write every repetition's numbers here")
    args = p.parse_args(argv)
    if args.command == "client":
        print(json.dumps(client(args)))
        return 0
    prepare(args)
    rows: dict[str, Any] = {
        "annserve TCP, cache on (default)": lambda: remote_rep(args, None),
        "annserve TCP, --cache-gb 0": lambda: remote_rep(args, "0"),
    }
    if args.no_annbatch:
        pass
    elif args.annbatch_python.exists():
        rows["annbatch in-process (annbatch 0.3.1)"] = lambda: annbatch_rep(args)
    else:
        print(f"annbatch row unavailable: no environment at {args.annbatch_python}")
    results: dict[str, list[list[dict[str, Any]]]] = {k: [] for k in rows}
    labels = list(rows)
    for rep in range(args.reps):
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            results[label].append(rows[label]())
            print(f"rep {rep + 1} {label}: {time.perf_counter() - t0:.1f} s", flush=True)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
