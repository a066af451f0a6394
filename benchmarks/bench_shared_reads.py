"""Daemon CPU of 1, 2, 4 identical trainers with shared reads on and off (issue 14 item 3).

Identical trainers (a hyperparameter sweep: same store, batch size, chunks, seed and
epochs) are separate processes (``bench_shared_reads.py client``: ``RemoteLoader`` over
loopback TCP, X as torch sparse CSR, every value summed as a first layer would). All
trainers of a round connect and take one batch, then start their measured stretch
together (a line on stdin) and stream ``--max-cells`` cells each, epoch after epoch.
One daemon per store and setting (``annserve`` and ``annserve --no-shared-reads``)
runs all along; rounds are interleaved (every configuration once per repetition, the
order rotated) and each figure is the median over repetitions.

Columns: aggregate cells/s (all trainers' cells over the round's span), the daemon's
CPU per cell sent and per trainer-epoch (its CPU over the round divided by the epochs
the trainers consumed together), that CPU relative to one trainer with the same
setting, and the share of preload-buffer pieces served from another stream's read
(``annserve_preload_buffers_total{source="shared"}``).

    python benchmarks/bench_shared_reads.py --store /tmp/atlas50k_none.zarr \
        --store /tmp/atlas50k.annbatch.zarr --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _daemon import (
    Daemon,
    add_round_args,
    client_parser,
    interleaved,
    loader_flags,
    run_synced,
    synced_stream,
    torch_batches,
)

PIECES = re.compile(r'^annserve_preload_buffers_total\{.*source="(\w+)".*\} (\S+)$', re.M)


def run_client(args: argparse.Namespace) -> int:
    """One trainer: connect, take a batch, say so, wait for a line on stdin, stream; print JSON."""
    return synced_stream(torch_batches(args), args.max_cells)


def pieces(daemon: Daemon) -> dict[str, float]:
    """Preload-buffer pieces streams got so far, by source (``read``, ``shared``)."""
    totals: dict[str, float] = {}
    for source, value in PIECES.findall(daemon.metrics()):
        totals[source] = totals.get(source, 0.0) + float(value)
    return totals


def run_round(
    daemon: Daemon, n_clients: int, n_obs: int, args: argparse.Namespace
) -> dict[str, float]:
    """Run ``n_clients`` identical trainers at once; return the round's figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "client"]
    cmd += ["--address", daemon.address, "--seed", str(args.seed), *loader_flags(args)]
    cmds = [[*cmd, "--max-cells", str(args.max_cells)]] * n_clients
    results, served = run_synced(
        cmds, args.timeout, lambda: {**pieces(daemon), "cpu": daemon.cpu_seconds()}
    )
    daemon_cpu = served.pop("cpu")
    if len({round(r["checksum"], -3) for r in results}) != 1:
        msg = f"identical trainers got different data: {[r['checksum'] for r in results]}"
        raise RuntimeError(msg)
    cells = sum(r["cells"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    got = sum(served.values())
    return {
        "cells_per_s": cells / span,
        "daemon_us_per_cell": daemon_cpu / cells * 1e6,
        "daemon_s_per_trainer_epoch": daemon_cpu / (cells / n_obs),
        "daemon_s": daemon_cpu,
        "shared_share": served.get("shared", 0.0) / got if got else 0.0,
    }


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (``client ...`` runs one trainer)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, action="append", help="store to serve (repeat)")
    p.add_argument("--clients", default="1,2,4", help="comma-separated trainer counts")
    p.add_argument(
        "--transport",
        choices=["tcp", "shm"],
        default="tcp",
        help="loopback TCP, or a unix socket with the shared-memory transport (same host)",
    )
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--seed", type=int, default=0, help="every trainer's seed")
    add_round_args(p, max_cells=100_000)
    p.add_argument("--json", type=Path, help="write every round's figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds; print one table row per configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        p = client_parser("bench_shared_reads.py client", max_cells=100_000)
        return run_client(p.parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    if not args.store:
        build_parser().error("--store is required")
    from annserve.server import open_store

    n_obs = {s: open_store(s).n_obs for s in args.store}
    clients = [int(c) for c in args.clients.split(",")]
    tmp = tempfile.TemporaryDirectory()
    unix = {
        (s, on): Path(tmp.name) / f"{i}-{on}.sock" if args.transport == "shm" else None
        for i, s in enumerate(args.store)
        for on in (True, False)
    }
    daemons = {
        (s, on): Daemon(s, [] if on else ["--no-shared-reads"], unix[s, on], metrics=True)
        for s in args.store
        for on in (True, False)
    }
    configs = [(s, on, c) for s in args.store for c in clients for on in (True, False)]
    t_start = time.monotonic()
    try:
        rounds = interleaved(
            configs,
            args.reps,
            lambda k: run_round(daemons[k[:2]], k[2], n_obs[k[0]], args),
            lambda k, r: (
                f"{k[0].name} shared={k[1]} trainers {k[2]}: {r['cells_per_s']:,.0f} cells/s, "
                f"{r['daemon_us_per_cell']:.1f} daemon µs/cell"
            ),
        )
    finally:
        for daemon in daemons.values():
            daemon.stop()
        tmp.cleanup()
    transport = "TCP loopback" if args.transport == "tcp" else "unix socket + shared memory"
    print(
        f"identical trainers (seed {args.seed}), {transport}, batch {args.batch_size}, chunk "
        f"{args.chunk_size} x preload {args.preload_nchunks}, shuffled, torch CSR, "
        f"{args.max_cells:,} cells per trainer, medians of {args.reps} interleaved reps, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - t_start:.0f} s"
    )
    print(
        "| store | shared reads | trainers | cells/s | daemon CPU µs/cell "
        "| daemon CPU s per trainer-epoch | daemon CPU vs 1 trainer | pieces shared |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|"
    )
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in rounds.items() if v}
    for s, on, c in sorted(configs, key=lambda k: (str(k[0]), not k[1], k[2])):
        m, one = med[s, on, c], med[s, on, clients[0]]
        print(
            f"| {s.name} | {'on' if on else 'off'} | {c} | {m['cells_per_s']:,.0f} "
            f"| {m['daemon_us_per_cell']:.1f} | {m['daemon_s_per_trainer_epoch']:.2f} "
            f"| {m['daemon_s'] / one['daemon_s']:.2f}× | {m['shared_share']:.0%} |"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({f"{s.name},{on},{c}": r for (s, on, c), r in rounds.items()}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
