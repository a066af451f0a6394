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
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ANNBATCH_PYTHON = HERE / ".venv-annbatch" / "bin" / "python"
_LISTEN_TCP = re.compile(r"listening on [\d.]+:(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
EPOCHS = 3


def daemon_cpu_s(pid: int) -> float:
    """CPU time of a process, user + system, all threads, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class Daemon:
    """``annserve --store COLLECTION --port 0 [--cache-gb GB]`` as a subprocess."""

    def __init__(self, store: Path, cache_gb: str | None, timeout: float = 120.0) -> None:
        cmd = [sys.executable, "-m", "annserve.server.rpc.cli", "--store", str(store)]
        cmd += ["--host", "127.0.0.1", "--port", "0", "--zarr-pipeline", "zarrs"]
        if cache_gb is not None:
            cmd += ["--cache-gb", cache_gb]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.log: list[str] = []
        self.address = ""
        ready = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                if m := _LISTEN_TCP.search(line):
                    self.address = f"127.0.0.1:{m.group(1)}"
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        if not ready.wait(timeout) or not self.address:
            self.stop()
            msg = f"annserve did not start: {''.join(self.log[-5:])}"
            raise RuntimeError(msg)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def client(args: argparse.Namespace) -> dict[str, Any]:
    """Stream ``EPOCHS`` epochs through ``RemoteLoader``; per epoch: seconds, CPU, cells."""
    import warnings

    from annserve.client import RemoteLoader

    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)
    loader = RemoteLoader(
        args.address,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        shuffle=True,
        seed=0,
    )
    epochs = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = usage.ru_utime + usage.ru_stime
        server0 = daemon_cpu_s(args.server_pid)
        t0 = time.perf_counter()
        cells, checksum = 0, 0.0
        for batch in loader:
            x = batch["X"]
            checksum += float(x.values().sum())
            cells += x.shape[0]
        seconds = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_SELF)
        epochs.append(
            {
                "cells": cells,
                "seconds": seconds,
                "cpu_s": usage.ru_utime + usage.ru_stime - cpu0,
                "server_cpu_s": daemon_cpu_s(args.server_pid) - server0,
                "checksum": checksum,
            }
        )
    return {"epochs": epochs}


def run_json(cmd: list[str], timeout: float = 600.0) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        msg = f"{' '.join(cmd[:3])} failed: {done.stderr[-2000:]}"
        raise RuntimeError(msg)
    return json.loads(done.stdout.strip().splitlines()[-1])


def remote_rep(args: argparse.Namespace, cache_gb: str | None) -> list[dict[str, Any]]:
    daemon = Daemon(args.collection, cache_gb)
    try:
        cmd = [sys.executable, __file__, "client", "--address", daemon.address]
        cmd += ["--server-pid", str(daemon.proc.pid)] + loader_args(args)
        epochs = run_json(cmd)["epochs"]
        for e in epochs:
            e["server_rss_mb"] = daemon.rss_mb()
        return epochs
    finally:
        daemon.stop()


def annbatch_rep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Epochs 1..3 of annbatch, each in a fresh process after 0, 1, 2 unmeasured epochs."""
    out = []
    for warm in range(EPOCHS):
        cmd = [str(args.annbatch_python), str(HERE / "annbatch_worker.py"), "run"]
        cmd += ["--collection", str(args.collection), "--warmup-epochs", str(warm)]
        cmd += loader_args(args)
        r = run_json(cmd)
        out.append({k: r[k] for k in ("cells", "seconds", "cpu_s", "checksum")})
    return out


def loader_args(args: argparse.Namespace) -> list[str]:
    return [
        "--batch-size",
        str(args.batch_size),
        "--chunk-size",
        str(args.chunk_size),
        "--preload-nchunks",
        str(args.preload_nchunks),
    ]


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
        q.add_argument("--batch-size", type=int, default=4096)
        q.add_argument("--chunk-size", type=int, default=32)
        q.add_argument("--preload-nchunks", type=int, default=256)
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
