"""Aggregate cells/s and CPU per cell of 1, 2, 4 concurrent trainers against ``annserve
--workers 1`` and ``--workers 2`` (issue 14 item 4), over loopback TCP.

Each trainer is a separate process (``bench_workers.py client``: ``RemoteLoader``, X as
torch sparse CSR, every value summed as a first layer would); all trainers of a round
connect and take one batch first, then start their measured stretch together (on a
line on stdin), so aggregate cells/s is all their cells over the time from that start
to the last one's end. Daemon CPU is that of every process of the daemon (supervisor, workers,
multiprocessing's resource tracker) over the same span; trainer CPU is the trainers'
own. Both daemons run all along (an idle one costs nothing); rounds are interleaved
(every configuration once per repetition, the order rotated) and each figure is the
median over repetitions.

    python benchmarks/bench_workers.py --store /tmp/atlas_none.zarr --reps 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent


def raw_frames(args: argparse.Namespace) -> Iterator[tuple[int, float]]:
    """Yield ``(rows, 0.0)`` per frame of epoch after epoch, read with grpc alone.

    No decoding into arrays: the daemon's side of the work is all that is measured.
    """
    import grpc

    from annserve.v1 import annserve_pb2 as pb
    from annserve.wire import decode_frame

    channel = grpc.insecure_channel(
        args.address,
        options=[("grpc.max_receive_message_length", 64 << 20)],
    )
    method = channel.unary_stream(
        "/annserve.v1.AnnServe/StreamBatches",
        request_serializer=pb.StreamBatchesRequest.SerializeToString,
        response_deserializer=None,  # the frames' bytes, decoded by decode_frame
    )
    for epoch in itertools.count():
        request = pb.StreamBatchesRequest(
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            preload_nchunks=args.preload_nchunks,
            shuffle=True,
            seed=args.seed,
            epoch=epoch,
        )
        for frame in method(request, timeout=600):
            yield decode_frame(frame).header.n_rows, 0.0


def run_client(args: argparse.Namespace) -> int:
    """One trainer: connect, take a batch, say so, wait for a line on stdin, stream; print JSON."""
    batches = raw_frames(args) if args.kind == "raw" else torch_batches(args)
    return synced_stream(batches, args.max_cells)


def run_round(daemon: Daemon, n_clients: int, args: argparse.Namespace) -> dict[str, float]:
    """Run ``n_clients`` trainers at once; return the round's figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "client", "--kind", args.trainer]
    cmd += ["--address", daemon.address, *loader_flags(args), "--max-cells", str(args.max_cells)]
    cmds = [[*cmd, "--seed", str(i)] for i in range(n_clients)]
    results, used = run_synced(cmds, args.timeout, lambda: {"cpu": daemon.cpu_seconds(tree=True)})
    daemon_cpu = used["cpu"]
    cells = sum(r["cells"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "cells_per_s": cells / span,
        "daemon_us_per_cell": daemon_cpu / cells * 1e6,
        "trainer_us_per_cell": sum(r["cpu_s"] for r in results) / cells * 1e6,
        "daemon_cores": daemon_cpu / span,
    }


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser (``client ...`` runs one trainer)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="store the daemons serve")
    p.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    p.add_argument("--clients", default="1,2,4", help="comma-separated trainer counts")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    add_round_args(p, max_cells=150_000)
    p.add_argument(
        "--trainer",
        choices=["torch", "raw"],
        default="torch",
        help="torch: RemoteLoader, X as torch CSR, values summed; raw: grpc frames counted, "
        "not decoded, so the daemon is the bottleneck (default %(default)s)",
    )
    p.add_argument("--json", type=Path, help="write every round's figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds; print one table row per configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        p = client_parser("bench_workers.py client", max_cells=150_000)
        p.add_argument("--kind", choices=["torch", "raw"], default="torch")
        return run_client(p.parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.store is None:
        build_parser().error("--store is required")
    workers = [int(w) for w in args.workers.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    daemons = {w: Daemon(args.store, ["--workers", str(w)]) for w in workers}
    configs = [(w, c) for c in clients for w in workers]
    t_start = time.monotonic()
    try:
        rounds = interleaved(
            configs,
            args.reps,
            lambda k: run_round(daemons[k[0]], k[1], args),
            lambda k, r: f"workers {k[0]} trainers {k[1]}: {r['cells_per_s']:,.0f} cells/s",
        )
    finally:
        for daemon in daemons.values():
            daemon.stop()
    print(
        f"store {args.store.name}, {args.trainer} trainers, TCP loopback, batch "
        f"{args.batch_size}, chunk {args.chunk_size} x preload {args.preload_nchunks}, shuffled, "
        f"{args.max_cells:,} cells per trainer, medians of {args.reps} interleaved reps, "
        f"{os.cpu_count()} CPUs, {time.monotonic() - t_start:.0f} s"
    )
    header = (
        "| store | --workers | trainers | cells/s | daemon CPU µs/cell | daemon cores "
        "| trainer CPU µs/cell |\n|---|--:|--:|--:|--:|--:|--:|"
    )
    print(header)
    for w, c in sorted(configs):
        med = {k: statistics.median(r[k] for r in rounds[w, c]) for k in rounds[w, c][0]}
        print(
            f"| {args.store.name} | {w} | {c} | {med['cells_per_s']:,.0f} "
            f"| {med['daemon_us_per_cell']:.1f} | {med['daemon_cores']:.2f} "
            f"| {med['trainer_us_per_cell']:.1f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({f"{w},{c}": r for (w, c), r in rounds.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
