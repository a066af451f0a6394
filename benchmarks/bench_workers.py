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
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _measure import cpu_seconds, process_cpu_seconds

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


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


def torch_batches(args: argparse.Namespace) -> Iterator[tuple[int, float]]:
    """Yield ``(rows, sum of X's values)`` per batch of epoch after epoch (RemoteLoader)."""
    from annserve.client import Output, RemoteLoader

    loader = RemoteLoader(
        args.address,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        shuffle=True,
        seed=args.seed,
        output=Output(to_torch=True),
    )

    for epoch in itertools.count():
        loader.set_epoch(epoch)
        for batch in loader:
            x = batch["X"]
            yield x.shape[0], float(x.values().sum())


def run_client(args: argparse.Namespace) -> int:
    """One trainer: connect, take a batch, say so, wait for a line on stdin, stream; print JSON."""
    batches = raw_frames(args) if args.kind == "raw" else torch_batches(args)
    next(batches)  # connected, the daemon's first preload buffer read
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    t0, cpu0 = time.time(), cpu_seconds()
    cells = 0
    checksum = 0.0
    for rows, total in batches:
        checksum += total
        cells += rows
        if cells >= args.max_cells:
            break
    result = {
        "cells": cells,
        "start": t0,
        "end": time.time(),
        "cpu_s": cpu_seconds() - cpu0,
        "checksum": checksum,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return out


class Daemon:
    """``annserve --workers N`` on 127.0.0.1 and a free port, serving one store."""

    def __init__(self, store: Path, workers: int, timeout: float = 180.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
        self.workers = workers
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "annserve.server.rpc.cli"),
                *("--store", str(store), "--host", "127.0.0.1", "--port", "0"),
                *("--workers", str(workers)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.address = ""
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                if (m := LISTENING.search(line)) and not self.address:
                    self.address = f"127.0.0.1:{m.group(1)}"
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.address:
            self.stop()
            msg = f"annserve --workers {workers} did not start"
            raise RuntimeError(msg)

    def cpu_seconds(self) -> float:
        """CPU of every process of the daemon so far, seconds (exited ones not counted)."""
        total = 0.0
        for pid in process_tree(self.proc.pid):
            try:
                total += process_cpu_seconds(pid)
            except FileNotFoundError:
                continue
        return total

    def stop(self) -> None:
        """SIGTERM, wait, kill if needed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def run_round(daemon: Daemon, n_clients: int, args: argparse.Namespace) -> dict[str, float]:
    """Run ``n_clients`` trainers at once; return the round's figures."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "client",
        *("--kind", args.trainer),
        *("--address", daemon.address),
        *("--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)),
        *("--preload-nchunks", str(args.preload_nchunks), "--max-cells", str(args.max_cells)),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(i)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(n_clients)
    ]
    for p in procs:  # each has its first batch
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            msg = f"trainer failed: {p.communicate(timeout=args.timeout)[1].strip()[-500:]}"
            raise RuntimeError(msg)
    cpu0 = daemon.cpu_seconds()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            msg = f"trainer failed: {err.strip().splitlines()[-3:]}"
            raise RuntimeError(msg)
        results.append(json.loads(out.strip().splitlines()[-1]))
    daemon_cpu = daemon.cpu_seconds() - cpu0
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
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument(
        "--max-cells",
        type=int,
        default=150_000,
        help="cells per trainer per round, epochs one after another (default %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per round")
    p.add_argument(
        "--trainer",
        choices=["torch", "raw"],
        default="torch",
        help="torch: RemoteLoader, X as torch CSR, values summed; raw: grpc frames counted, "
        "not decoded, so the daemon is the bottleneck (default %(default)s)",
    )
    p.add_argument("--json", type=Path, help="write every round's figures here")
    return p


def client_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_workers.py client")
    p.add_argument("--address", required=True)
    p.add_argument("--kind", choices=["torch", "raw"], default="torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument("--max-cells", type=int, default=150_000)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds; print one table row per configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return run_client(client_parser().parse_args(argv[1:]))
    args = build_parser().parse_args(argv)
    if args.store is None:
        build_parser().error("--store is required")
    workers = [int(w) for w in args.workers.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    daemons = {w: Daemon(args.store, w) for w in workers}
    configs = [(w, c) for c in clients for w in workers]
    rounds: dict[tuple[int, int], list[dict[str, float]]] = {k: [] for k in configs}
    t_start = time.monotonic()
    try:
        for rep in range(args.reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for w, c in order:
                result = run_round(daemons[w], c, args)
                rounds[w, c].append(result)
                print(
                    f"  rep {rep} workers {w} trainers {c}: {result['cells_per_s']:,.0f} cells/s",
                    file=sys.stderr,
                    flush=True,
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
