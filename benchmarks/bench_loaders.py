"""Compare annserve's RemoteLoader with in-process loaders on one AnnData store.

Rows of the table (see README.md):

(a) ``RemoteLoader`` against an ``annserve`` daemon subprocess, over loopback TCP
    and over a unix socket, with the ``compact`` and ``raw`` wire encodings;
(b) the daemon's pipeline in-process without gRPC (``open_store`` + ``ChunkSampler``
    + ``read_rows``, batches built as torch sparse CSR tensors);
(c) annbatch's ``Loader`` in-process over its own preshuffled collection of the
    same data (separate Python 3.12 environment);
(d) the whole X in memory as scipy CSR, fancy-indexed batches (upper bound).

Every repetition runs in a fresh client process; repetitions are interleaved
(round-robin, order rotated each round) so that machine noise hits all rows
alike, and the table reports medians.

Example
-------
    python benchmarks/make_atlas.py --out /tmp/atlas.zarr
    python benchmarks/bench_loaders.py --store /tmp/atlas.zarr
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ANNBATCH_PYTHON = HERE / ".venv-annbatch" / "bin" / "python"
_LISTEN_TCP = re.compile(r"listening on [\d.]+:(\d+)")
_LISTEN_UNIX = re.compile(r"listening on unix:(\S+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: zarr codec pipelines by the names annserve's ``--zarr-pipeline`` flag uses.
ZARR_PIPELINES = {
    "zarrs": "zarrs.ZarrsCodecPipeline",
    "zarr-python": "zarr.core.codec_pipeline.BatchedCodecPipeline",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One configuration of the table.

    Attributes
    ----------
    key
        Short name used by ``--only`` and in the JSON output.
    label
        Text of the table's first column.
    kind
        ``remote``, ``sampler``, ``annbatch`` or ``scipy``.
    transport
        ``tcp`` or ``unix`` for remote rows, else empty.
    encoding
        Wire encoding of remote rows, else empty.
    """

    key: str
    label: str
    kind: str
    transport: str = ""
    encoding: str = ""


ROWS = (
    Row("tcp-compact", "(a) annserve TCP compact", "remote", "tcp", "compact"),
    Row("tcp-raw", "(a) annserve TCP raw", "remote", "tcp", "raw"),
    Row("unix-compact", "(a) annserve unix compact", "remote", "unix", "compact"),
    Row("unix-raw", "(a) annserve unix raw", "remote", "unix", "raw"),
    Row("sampler", "(b) sampler in-process", "sampler"),
    Row("annbatch", "(c) annbatch Loader", "annbatch"),
    Row("scipy", "(d) scipy in-memory", "scipy"),
)


@dataclass(slots=True)
class RowResult:
    """Repetitions of one row, or why it could not run.

    Attributes
    ----------
    row
        The configuration.
    reps
        One worker result per successful repetition (see ``_measure.measure``), plus
        ``server_*`` fields for remote rows.
    unavailable
        Reason the row has no result; empty when it ran.
    """

    row: Row
    reps: list[dict[str, Any]] = field(default_factory=list)
    unavailable: str = ""

    def median(self, key: str) -> float:
        """Median of one field over the repetitions (NaN when absent)."""
        values = [r[key] for r in self.reps if key in r]
        return statistics.median(values) if values else float("nan")


class Daemon:
    """An ``annserve`` daemon subprocess serving one store.

    Parameters
    ----------
    store
        Store to serve.
    unix_path
        Also listen on this unix socket; None for TCP only.
    pipeline
        zarr codec pipeline, a key of :data:`ZARR_PIPELINES`.
    env
        Environment of the daemon.
    timeout
        Seconds to wait for it to listen.

    Raises
    ------
    RuntimeError
        If the daemon exits or does not log its addresses within ``timeout``.
    """

    def __init__(
        self,
        store: Path,
        unix_path: Path | None,
        pipeline: str,
        env: dict[str, str],
        timeout: float = 120.0,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "annserve.server.rpc.cli",
            "--store",
            str(store),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-level",
            "INFO",
        ]
        if unix_path is not None:
            cmd += ["--unix", str(unix_path)]
        if "--zarr-pipeline" in daemon_help():
            cmd += ["--zarr-pipeline", pipeline]
        else:  # older daemon: zarr reads its config from the environment
            env = {**env, "ZARR_CODEC_PIPELINE__PATH": ZARR_PIPELINES[pipeline]}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.log: list[str] = []
        self.addresses: dict[str, str] = {}
        self._ready = threading.Event()
        self._want_unix = unix_path is not None
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(timeout) or not self.addresses:
            self.stop()
            tail = "".join(self.log[-5:]).strip()
            msg = f"annserve did not start: {tail or 'no output'}"
            raise RuntimeError(msg)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := _LISTEN_TCP.search(line):
                self.addresses["tcp"] = f"127.0.0.1:{m.group(1)}"
            elif m := _LISTEN_UNIX.search(line):
                self.addresses["unix"] = f"unix:{m.group(1)}"
            if "tcp" in self.addresses and ("unix" in self.addresses or not self._want_unix):
                self._ready.set()
        self._ready.set()  # exited: wake the waiter

    def memory_mb(self, field_name: str) -> float:
        """``VmHWM`` (peak) or ``VmRSS`` (now) of the daemon, MiB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU time the daemon has used, user + system, seconds."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self) -> None:
        """SIGTERM the daemon and wait for it (SIGKILL after 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@functools.cache
def daemon_help() -> str:
    """``annserve --help`` of this checkout, to tell which flags it has."""
    out = subprocess.run(
        [sys.executable, "-m", "annserve.server.rpc.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return out.stdout


def git_state() -> str:
    """Commit of the checkout being measured, with ``-dirty`` for uncommitted changes."""
    out = subprocess.run(
        ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def run_json(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a worker and parse the JSON on the last line of its stdout.

    Raises
    ------
    RuntimeError
        If it fails, times out, or prints no JSON; the message ends with its stderr tail.
    """
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        msg = f"timed out after {timeout:g} s"
        raise RuntimeError(msg) from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        msg = f"exit {out.returncode}: {tail[0]}"
        raise RuntimeError(msg)
    return json.loads(lines[-1])


def loader_args(args: argparse.Namespace, seed: int) -> list[str]:
    """Command-line options every worker shares."""
    out = [
        "--batch-size",
        str(args.batch_size),
        "--chunk-size",
        str(args.chunk_size),
        "--preload-nchunks",
        str(args.preload_nchunks),
        "--seed",
        str(seed),
    ]
    if not args.shuffle:
        out.append("--no-shuffle")
    if args.max_cells is not None:
        out += ["--max-cells", str(args.max_cells)]
    if args.warmup_epochs:
        out += ["--warmup-epochs", str(args.warmup_epochs)]
    if args.cold:
        out.append("--cold")
    return out


def worker_cmd(
    row: Row, args: argparse.Namespace, seed: int, daemons: dict[str, Daemon]
) -> list[str]:
    """Command line of one repetition of ``row``."""
    if row.kind == "annbatch":
        return [
            str(args.annbatch_python),
            str(HERE / "annbatch_worker.py"),
            "run",
            "--collection",
            str(args.collection),
            *loader_args(args, seed),
        ]
    cmd = [sys.executable, str(HERE / "loader_worker.py"), row.kind, *loader_args(args, seed)]
    if row.kind == "remote":
        daemon = daemons[row.key]
        return cmd + [
            "--address",
            daemon.addresses[row.transport],
            "--encoding",
            row.encoding,
            "--server-pid",
            str(daemon.proc.pid),
        ]
    return cmd + ["--store", str(args.store), "--zarr-pipeline", args.zarr_pipeline]


def run_rep(
    result: RowResult,
    args: argparse.Namespace,
    seed: int,
    daemons: dict[str, Daemon],
    env: dict[str, str],
) -> None:
    """Run one repetition of a row and record it (or the reason it failed)."""
    daemon = daemons.get(result.row.key)
    cpu0 = daemon.cpu_s() if daemon else 0.0
    try:
        rep = run_json(worker_cmd(result.row, args, seed, daemons), env, args.worker_timeout)
    except RuntimeError as e:
        print(f"  {result.row.key}: failed: {e}", flush=True)
        result.unavailable = result.unavailable or f"failed: {e}"
        return
    if daemon is not None:
        rep.setdefault("server_cpu_s", daemon.cpu_s() - cpu0)  # the worker's is exact
        rep["server_rss_mb"] = daemon.memory_mb("VmRSS")
        rep["server_peak_mb"] = daemon.memory_mb("VmHWM")
    result.reps.append(rep)
    print(
        f"  {result.row.key:<13} {rep['cells'] / rep['seconds']:>10,.0f} cells/s  "
        f"first batch {rep['first_batch_s']:.2f} s",
        flush=True,
    )


def start_daemons(
    rows: list[RowResult], args: argparse.Namespace, env: dict[str, str], sock_dir: Path
) -> dict[str, Daemon]:
    """Start one daemon per remote row, so each daemon's peak RSS is its row's own."""
    unix_ok = "--unix" in daemon_help()
    daemons = {}
    for r in rows:
        if r.row.kind != "remote":
            continue
        if r.row.transport == "unix" and not unix_ok:
            r.unavailable = "unavailable: this annserve has no --unix flag"
            continue
        unix_path = sock_dir / f"{r.row.key}.sock" if r.row.transport == "unix" else None
        try:
            daemons[r.row.key] = Daemon(args.store, unix_path, args.zarr_pipeline, env)
        except RuntimeError as e:
            r.unavailable = f"unavailable: {e}"
    return daemons


def prepare_annbatch(
    result: RowResult, args: argparse.Namespace, n_obs: int, env: dict[str, str]
) -> dict[str, Any]:
    """Make sure annbatch's collection of the store exists; return prepare facts.

    Marks the row unavailable (with the reason) when the annbatch environment is
    missing or the collection cannot be built.
    """
    py = args.annbatch_python
    if not py.exists():
        result.unavailable = (
            f"unavailable: no annbatch environment at {py} (see benchmarks/README.md)"
        )
        return {}
    try:
        info = run_json(
            [
                str(py),
                str(HERE / "annbatch_worker.py"),
                "info",
                "--collection",
                str(args.collection),
            ],
            env,
            300,
        )
        if info.get("n_obs") == n_obs and not args.rebuild_collection:
            return {"versions": info, "reused": True}
        print(f"building annbatch collection {args.collection} ...", flush=True)
        prep = run_json(
            [
                str(py),
                str(HERE / "annbatch_worker.py"),
                "prepare",
                "--store",
                str(args.annbatch_source or args.store),
                "--collection",
                str(args.collection),
                "--seed",
                str(args.seed),
            ],
            env,
            1800,
        )
    except RuntimeError as e:
        result.unavailable = f"unavailable: {e}"
        return {}
    return {"versions": info, "reused": False, **prep}


def store_facts(store: Path) -> dict[str, Any]:
    """Shape and non-zeros of the store's X (h5ad, zarr or a collection), from metadata."""
    import h5py
    import zarr

    root = h5py.File(store, "r") if store.is_file() else zarr.open_group(store, mode="r")
    xs = [root["X"]] if "X" in root else [g["X"] for _, g in root.groups()]
    return {
        "n_obs": sum(int(x.attrs["shape"][0]) for x in xs),
        "n_vars": int(xs[0].attrs["shape"][1]),
        "nnz": sum(int(x["data"].shape[0]) for x in xs),
    }


def warm_page_cache(paths: list[Path]) -> float:
    """Read every file under ``paths`` once so no row pays for a cold cache; return MiB read."""
    total = 0
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            with open(p, "rb") as f:
                while chunk := f.read(16 << 20):
                    total += len(chunk)
    return total / 2**20


def run_all(
    results: list[RowResult],
    args: argparse.Namespace,
    daemons: dict[str, Daemon],
    env: dict[str, str],
) -> None:
    """Run ``args.reps`` rounds; each round runs every available row once, rotated."""
    for rep in range(args.reps):
        live = [r for r in results if not r.unavailable]
        shift = rep % max(1, len(live))
        print(f"round {rep + 1}/{args.reps}", flush=True)
        for r in live[shift:] + live[:shift]:
            run_rep(r, args, args.seed + rep, daemons, env)


def fmt(value: float, spec: str) -> str:
    """Format a number, or a dash when it is NaN."""
    return "-" if math.isnan(value) else format(value, spec)


def rate(r: RowResult) -> float:
    """Median cells/s of a row (NaN when it has no repetitions)."""
    if not r.reps:
        return float("nan")
    return statistics.median(rep["cells"] / rep["seconds"] for rep in r.reps)


HEADER = (
    "loader",
    "cells/s",
    "MB/s",
    "1st batch s",
    "setup s",
    "client RSS MiB",
    "above imports",
    "server RSS MiB",
    "client CPU s",
    "server CPU s",
    "cells/CPU-s",
    "x annbatch",
    "x in-memory",
)


def table_rows(results: list[RowResult]) -> list[tuple[str, ...]]:
    """Cells of the table, one tuple per row, medians over repetitions."""
    by_key = {r.row.key: r for r in results}
    ref_c, ref_d = (rate(by_key[k]) if k in by_key else float("nan") for k in ("annbatch", "scipy"))
    out = []
    for r in results:
        if not r.reps:
            out.append((r.row.label, r.unavailable or "no result", *[""] * (len(HEADER) - 2)))
            continue
        cells_s = rate(r)
        mb_s = statistics.median(8 * rep["nnz"] / rep["seconds"] / 1e6 for rep in r.reps)
        above = statistics.median(rep["rss_peak_mb"] - rep["rss_base_mb"] for rep in r.reps)
        per_cpu = statistics.median(
            rep["cells"] / (rep["cpu_s"] + rep.get("server_cpu_s", 0.0)) for rep in r.reps
        )
        server_peak = max(
            (rep.get("server_peak_mb", float("nan")) for rep in r.reps), default=float("nan")
        )
        out.append(
            (
                r.row.label,
                fmt(cells_s, ",.0f"),
                fmt(mb_s, ",.0f"),
                fmt(r.median("first_batch_s"), ".2f"),
                fmt(r.median("setup_s"), ".2f"),
                fmt(r.median("rss_peak_mb"), ",.0f"),
                fmt(above, "+,.0f"),
                fmt(server_peak, ",.0f"),
                fmt(r.median("cpu_s"), ".1f"),
                fmt(r.median("server_cpu_s"), ".1f"),
                fmt(per_cpu, ",.0f"),
                fmt(cells_s / ref_c, ".2f"),
                fmt(cells_s / ref_d, ".2f"),
            )
        )
    return out


def print_table(results: list[RowResult]) -> None:
    """Print the results as a markdown table."""
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    print(line(HEADER))
    print(
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    for row in rows[1:]:
        print(line(row))


def print_notes(
    results: list[RowResult], args: argparse.Namespace, annbatch: dict[str, Any]
) -> None:
    """Print what the table does not show: checksums, server RSS per epoch, annbatch setup."""
    sums = {r.row.key: [rep["checksum"] for rep in r.reps] for r in results if r.reps}
    if args.max_cells is None and sums:
        flat = [s for v in sums.values() for s in v]
        agree = max(flat) - min(flat) <= 1e-6 * max(abs(x) for x in flat)
        verdict = "agree" if agree else f"DISAGREE: {sums}"
        print(f"- checksums (sum of all X values in an epoch, every row and repetition) {verdict}")
    for r in results:
        if r.row.kind == "remote" and r.reps:
            rss = ", ".join(f"{rep['server_rss_mb']:,.0f}" for rep in r.reps)
            print(f"- {r.row.key}: daemon RSS after each epoch (MiB): {rss}")
    if annbatch.get("versions"):
        v = annbatch["versions"]
        print(
            f"- annbatch {v['annbatch']} (anndata {v['anndata']}, zarr {v['zarr']}, "
            f"zarrs {v['zarrs']}, torch {v['torch']}), collection {args.collection}"
        )
    if annbatch.get("seconds"):
        print(
            f"- annbatch preshuffle (DatasetCollection.add_adatas): {annbatch['seconds']:.1f} s, "
            f"peak RSS {annbatch['rss_peak_mb']:,.0f} MiB"
        )
    for r in results:
        if r.unavailable:
            print(f"- {r.row.key}: {r.unavailable}")


def print_header(facts: dict[str, Any], args: argparse.Namespace, warmed_mib: float) -> None:
    """Print what was measured, on what."""
    order = "shuffled" if args.shuffle else "in order"
    cells = f"{args.max_cells:,} cells" if args.max_cells else "one epoch"
    if args.warmup_epochs:
        cells += f" measured after {args.warmup_epochs} warm-up epoch(s) in the same process"
    print(
        f"\nstore {args.store}: {facts['n_obs']:,} cells x {facts['n_vars']:,} genes, "
        f"{facts['nnz']:,} non-zeros ({facts['nnz'] / facts['n_obs']:,.0f} per cell)"
    )
    cache = (
        "page cache dropped before each measured epoch"
        if args.cold
        else f"page cache warmed with {warmed_mib:,.0f} MiB"
    )
    print(
        f"{order}, batch_size {args.batch_size}, chunk_size {args.chunk_size}, "
        f"preload_nchunks {args.preload_nchunks}; {cells} per repetition, median of "
        f"{args.reps}; {os.cpu_count()} CPUs; {cache}; "
        f"zarr pipeline of (a), (b), (d): {args.zarr_pipeline}; annserve {git_state()}\n"
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--store", required=True, type=Path, help="AnnData store (from make_atlas.py)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch")
    p.add_argument("--chunk-size", type=int, default=32, help="contiguous rows per chunk")
    p.add_argument("--preload-nchunks", type=int, default=256, help="chunks per preload buffer")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="read in order")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per row, median reported (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--max-cells", type=int, default=None, help="cells per repetition (default: one full epoch)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of repetition 1 (then +1 each)")
    p.add_argument(
        "--only", default=None, help="comma-separated rows to run: " + ",".join(r.key for r in ROWS)
    )
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="epochs each repetition consumes, unmeasured, before the measured "
        "one (steady state of a long run: buffers and caches warm)",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache (root only) before each measured epoch instead of "
        "warming it: reads come from disk, as for an atlas larger than memory",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 repetition of 20,000 cells unless given otherwise",
    )
    p.add_argument(
        "--annbatch-python",
        type=Path,
        default=ANNBATCH_PYTHON,
        help="python of the annbatch environment",
    )
    p.add_argument(
        "--collection",
        type=Path,
        default=None,
        help="annbatch collection (default: beside the store, <stem>.annbatch.zarr)",
    )
    p.add_argument(
        "--annbatch-source",
        type=Path,
        default=None,
        help="AnnData store the annbatch collection is built from (default: --store; "
        "needed when --store is an annserve collection, which annbatch cannot "
        "read as one AnnData)",
    )
    p.add_argument(
        "--rebuild-collection",
        action="store_true",
        help="rebuild the annbatch collection even if one of the right size exists",
    )
    p.add_argument(
        "--zarr-pipeline",
        choices=sorted(ZARR_PIPELINES),
        default="zarrs",
        help="zarr codec pipeline of the daemon and of rows (b) and (d)",
    )
    p.add_argument(
        "--worker-timeout", type=float, default=300.0, help="seconds one repetition may take"
    )
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    return p


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line and fill in derived defaults."""
    args = build_parser().parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.quick and args.max_cells is None:
        args.max_cells = 20_000
    if args.collection is None:
        args.collection = args.store.with_name(args.store.stem + ".annbatch.zarr")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; return the exit code."""
    args = resolve_args(argv)
    if args.cold and os.geteuid() != 0:
        print("--cold drops the page cache, which needs root", file=sys.stderr)
        return 2
    if not args.store.exists():
        print(
            f"no store at {args.store}: run benchmarks/make_atlas.py --out {args.store}",
            file=sys.stderr,
        )
        return 2
    keys = args.only.split(",") if args.only else [r.key for r in ROWS]
    results = [RowResult(r) for r in ROWS if r.key in keys]
    facts = store_facts(args.store)
    # every process alike: torch's OpenMP threads sleep between batches instead of spinning
    # (spinning takes a core from whatever loads the data: a daemon, zarrs' threads)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    annbatch = {}
    for r in results:
        if r.row.kind == "annbatch":
            annbatch = prepare_annbatch(r, args, facts["n_obs"], env)
    warm = [args.store] + ([args.collection] if args.collection.exists() else [])
    warmed = 0.0 if args.cold else warm_page_cache(warm)
    sock_dir = Path(tempfile.mkdtemp(prefix="annserve-bench-"))
    daemons = start_daemons(results, args, env, sock_dir)
    try:
        run_all(results, args, daemons, env)
    finally:
        for d in daemons.values():
            d.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    print_header(facts, args, warmed)
    print_table(results)
    print()
    print_notes(results, args, annbatch)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "store": facts,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "annbatch": annbatch,
                    "rows": {
                        r.row.key: {"reps": r.reps, "unavailable": r.unavailable} for r in results
                    },
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
