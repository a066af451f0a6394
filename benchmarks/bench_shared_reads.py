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
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from _measure import cpu_seconds, process_cpu_seconds

if TYPE_CHECKING:
    from collections.abc import Iterator

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
METRICS = re.compile(r"metrics on (http://\S+/metrics)")
PIECES = re.compile(r'^annserve_preload_buffers_total\{.*source="(\w+)".*\} (\S+)$', re.M)


def run_client(args: argparse.Namespace) -> int:
    """One trainer: connect, take a batch, say so, wait for a line on stdin, stream; print JSON."""
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

    def epochs() -> Iterator[dict]:
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from loader

    batches = epochs()
    next(batches)  # connected, the daemon's first preload buffer read
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    t0, cpu0 = time.time(), cpu_seconds()
    cells, checksum = 0, 0.0
    for batch in batches:
        x = batch["X"]
        checksum += float(x.values().sum())
        cells += x.shape[0]
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


class Daemon:
    """``annserve`` on 127.0.0.1, a free port and a metrics port, serving one store."""

    def __init__(
        self, store: Path, shared: bool, unix: Path | None = None, timeout: float = 180.0
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
        flags = [] if shared else ["--no-shared-reads"]
        if unix is not None:  # same-host trainers: the shared-memory transport
            flags += ["--unix", str(unix)]
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "annserve.server.rpc.cli"),
                *("--store", str(store), "--host", "127.0.0.1", "--port", "0"),
                *("--metrics-port", "0", *flags),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.address = self.metrics_url = ""
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                if m := METRICS.search(line):
                    self.metrics_url = m.group(1)
                if (m := LISTENING.search(line)) and not self.address:
                    self.address = f"unix:{unix}" if unix else f"127.0.0.1:{m.group(1)}"
                if self.address and self.metrics_url:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.address:
            self.stop()
            msg = f"annserve {' '.join(flags)} on {store} did not start"
            raise RuntimeError(msg)

    def cpu_seconds(self) -> float:
        """CPU the daemon has used so far, all threads, seconds."""
        return process_cpu_seconds(self.proc.pid)

    def pieces(self) -> dict[str, float]:
        """Preload-buffer pieces streams got so far, by source (``read``, ``shared``)."""
        if not self.metrics_url:
            return {}
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:  # noqa: S310
            text = response.read().decode()
        totals: dict[str, float] = {}
        for source, value in PIECES.findall(text):
            totals[source] = totals.get(source, 0.0) + float(value)
        return totals

    def stop(self) -> None:
        """SIGTERM, wait, kill if needed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def run_round(
    daemon: Daemon, n_clients: int, n_obs: int, args: argparse.Namespace
) -> dict[str, float]:
    """Run ``n_clients`` identical trainers at once; return the round's figures."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "client",
        *("--address", daemon.address, "--seed", str(args.seed)),
        *("--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)),
        *("--preload-nchunks", str(args.preload_nchunks), "--max-cells", str(args.max_cells)),
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    procs = [
        subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(n_clients)
    ]
    for p in procs:  # each has its first batch
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            msg = f"trainer failed: {p.communicate(timeout=args.timeout)[1].strip()[-500:]}"
            raise RuntimeError(msg)
    cpu0, pieces0 = daemon.cpu_seconds(), daemon.pieces()
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
    pieces = {k: v - pieces0.get(k, 0.0) for k, v in daemon.pieces().items()}
    if len({round(r["checksum"], -3) for r in results}) != 1:
        msg = f"identical trainers got different data: {[r['checksum'] for r in results]}"
        raise RuntimeError(msg)
    cells = sum(r["cells"] for r in results)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    got = sum(pieces.values())
    return {
        "cells_per_s": cells / span,
        "daemon_us_per_cell": daemon_cpu / cells * 1e6,
        "daemon_s_per_trainer_epoch": daemon_cpu / (cells / n_obs),
        "daemon_s": daemon_cpu,
        "shared_share": pieces.get("shared", 0.0) / got if got else 0.0,
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
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument(
        "--max-cells",
        type=int,
        default=100_000,
        help="cells per trainer per round, epochs one after another (default %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per round")
    p.add_argument("--json", type=Path, help="write every round's figures here")
    return p


def client_parser() -> argparse.ArgumentParser:
    """Return the parser of ``bench_shared_reads.py client``."""
    p = argparse.ArgumentParser(prog="bench_shared_reads.py client")
    p.add_argument("--address", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--preload-nchunks", type=int, default=256)
    p.add_argument("--max-cells", type=int, default=100_000)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved rounds; print one table row per configuration."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return run_client(client_parser().parse_args(argv[1:]))
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
    daemons = {(s, on): Daemon(s, on, unix[s, on]) for s in args.store for on in (True, False)}
    configs = [(s, on, c) for s in args.store for c in clients for on in (True, False)]
    rounds: dict[tuple[Path, bool, int], list[dict[str, float]]] = {k: [] for k in configs}
    t_start = time.monotonic()
    try:
        for rep in range(args.reps):
            order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
            for s, on, c in order:
                result = run_round(daemons[s, on], c, n_obs[s], args)
                rounds[s, on, c].append(result)
                print(
                    f"  rep {rep} {s.name} shared={on} trainers {c}: "
                    f"{result['cells_per_s']:,.0f} cells/s, "
                    f"{result['daemon_us_per_cell']:.1f} daemon µs/cell",
                    file=sys.stderr,
                    flush=True,
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
