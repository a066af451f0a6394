"""Cells/s of 1, 2, 4... concurrent RemoteLoader clients sharing one annserve daemon.

Each client is a ``loader_worker.py remote`` process streaming one epoch with its own
seed; the table gives the total (all cells over the slowest client's time) and the
per-client rates, and the daemon's peak RSS after each round.

    python benchmarks/bench_concurrency.py --store /tmp/atlas_none.zarr --clients 1,2,4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _daemon import Daemon, add_loader_args, loader_flags

HERE = Path(__file__).resolve().parent


def run_round(address: str, n_clients: int, args: argparse.Namespace) -> list[dict]:
    """Start ``n_clients`` workers at once; return their JSON results."""
    cmd = [
        sys.executable,
        str(HERE / "loader_worker.py"),
        "remote",
        "--address",
        address,
        *loader_flags(args),
    ]
    if args.max_cells:
        cmd += ["--max-cells", str(args.max_cells)]
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(n_clients)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=args.timeout)
        if p.returncode != 0:
            msg = f"client failed: {err.strip().splitlines()[-1:]}"
            raise RuntimeError(msg)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--clients", default="1,2,4", help="comma-separated client counts")
    p.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    add_loader_args(p)
    p.add_argument("--max-cells", type=int, default=None, help="cells per client (default: epoch)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per round")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print one table row per client count."""
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "annserve.sock" if args.transport == "unix" else None
        flags = ["--zarr-pipeline", "zarrs", "--log-level", "INFO"]
        daemon = Daemon(args.store, flags, sock, timeout=120.0)
        try:
            print(
                f"{'clients':>7} {'total cells/s':>14} {'per client cells/s':>24} "
                f"{'server peak RSS MiB':>20}"
            )
            for n in (int(c) for c in args.clients.split(",")):
                results = run_round(daemon.address, n, args)
                rates = [r["cells"] / r["seconds"] for r in results]
                total = sum(r["cells"] for r in results) / max(r["seconds"] for r in results)
                print(
                    f"{n:>7} {total:>14,.0f} {', '.join(f'{x:,.0f}' for x in rates):>24} "
                    f"{daemon.memory_mb('VmHWM'):>20,.0f}",
                    flush=True,
                )
        finally:
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
