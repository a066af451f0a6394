"""Compare annserve's RemoteLoader with annbatch and in-process bounds, store by store.

Three stores of one atlas (see README.md), each named in every row:

``lz4``
    annbatch's own collection, ``DatasetCollection.add_adatas`` defaults (Blosc LZ4);
``none``
    annbatch's collection written uncompressed (``add_adatas(..., zarr_compressor=())``);
``annserve``
    annserve's converted store (``annserve convert --compression none``: uint16
    counts and gene indices, uncompressed).

Rows: annbatch's ``Loader`` in-process on ``lz4`` and ``none``; ``RemoteLoader``
same-host (unix socket, shared memory) and over TCP, on the gRPC stream and on the bulk
channel, all compact, on each of the three stores; on ``lz4`` and ``none`` also each
loader's second epoch in one trainer process (on ``lz4`` the daemon's decoded-chunk cache
warm; on both the trainer's buffers and connections made: a long run's steady state);
the daemon's pipeline in-process (no gRPC) and the whole X in memory (the bound) on
``annserve``. Ratios (of cells/s, and of trainer CPU per cell) compare a row only with
annbatch on the same store and epoch (on ``annserve``'s store, with the in-memory
bound).

Every repetition runs in a fresh trainer process; rows are interleaved within each
round (order rotated each round) so that machine noise hits all rows alike, and the
table reports medians. The run prints the table, writes it as markdown and a PNG chart
(cells/s per store; trainer and daemon CPU per cell) and prints their paths.

Example
-------
    python benchmarks/make_atlas.py --out /tmp/b14/atlas.zarr --n-obs 50000
    python benchmarks/bench_loaders.py --atlas /tmp/b14/atlas.zarr
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _daemon import Daemon, add_loader_args, loader_flags, passive_env, run_json

HERE = Path(__file__).resolve().parent
ANNBATCH_PYTHON = HERE / ".venv-annbatch" / "bin" / "python"
#: zarr codec pipelines by the names annserve's ``--zarr-pipeline`` flag uses.
ZARR_PIPELINES = {
    "zarrs": "zarrs.ZarrsCodecPipeline",
    "zarr-python": "zarr.core.codec_pipeline.BatchedCodecPipeline",
}
#: Store keys, in table order, with the text naming them in the table and the chart.
STORES = {
    "lz4": "annbatch collection, lz4 (add_adatas defaults)",
    "none": "annbatch collection, uncompressed (zarr_compressor=())",
    "annserve": "annserve convert --compression none (uint16)",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One configuration of the table.

    Attributes
    ----------
    key
        Short name used by ``--only`` and in the JSON output.
    label
        The loader, as the table's first column names it.
    kind
        ``remote``, ``sampler``, ``annbatch`` or ``scipy``.
    store
        Key of :data:`STORES` the row reads.
    transport
        ``shm`` (unix socket, shared memory), ``tcp`` (the gRPC stream) or ``bulk``
        (TCP, frames on the bulk channel) for remote rows, else empty.
    epoch
        The measured epoch of the trainer process (2: one epoch consumed unmeasured
        first, against the same daemon).
    """

    key: str
    label: str
    kind: str
    store: str
    transport: str = ""
    epoch: int = 1

    @property
    def fresh_daemon(self) -> bool:
        """Whether each repetition gets a new daemon: its chunk cache must start empty."""
        return self.kind == "remote" and self.store == "lz4"


SHM = "RemoteLoader same-host (unix, shared memory)"
TCP = "RemoteLoader TCP, gRPC stream (compact)"
BULK = "RemoteLoader TCP, bulk channel (compact)"
ROWS = (
    Row("annbatch-lz4", "annbatch Loader (in-process)", "annbatch", "lz4"),
    Row("shm-lz4", SHM, "remote", "lz4", "shm"),
    Row("tcp-lz4", TCP, "remote", "lz4", "tcp"),
    Row("bulk-lz4", BULK, "remote", "lz4", "bulk"),
    Row("annbatch-lz4-e2", "annbatch Loader (in-process)", "annbatch", "lz4", epoch=2),
    Row("shm-lz4-e2", SHM, "remote", "lz4", "shm", epoch=2),
    Row("tcp-lz4-e2", TCP, "remote", "lz4", "tcp", epoch=2),
    Row("bulk-lz4-e2", BULK, "remote", "lz4", "bulk", epoch=2),
    Row("annbatch-none", "annbatch Loader (in-process)", "annbatch", "none"),
    Row("shm-none", SHM, "remote", "none", "shm"),
    Row("tcp-none", TCP, "remote", "none", "tcp"),
    Row("bulk-none", BULK, "remote", "none", "bulk"),
    Row("annbatch-none-e2", "annbatch Loader (in-process)", "annbatch", "none", epoch=2),
    Row("shm-none-e2", SHM, "remote", "none", "shm", epoch=2),
    Row("tcp-none-e2", TCP, "remote", "none", "tcp", epoch=2),
    Row("bulk-none-e2", BULK, "remote", "none", "bulk", epoch=2),
    Row("shm-annserve", SHM, "remote", "annserve", "shm"),
    Row("tcp-annserve", TCP, "remote", "annserve", "tcp"),
    Row("bulk-annserve", BULK, "remote", "annserve", "bulk"),
    Row("sampler", "daemon pipeline in-process (no gRPC)", "sampler", "annserve"),
    Row("bound", "whole X in memory, scipy (the bound)", "scipy", "annserve"),
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
        ``server_peak_mb`` for remote rows.
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

    def per_cell_us(self, key: str) -> float:
        """Median over repetitions of a CPU field per cell, µs (NaN when absent)."""
        values = [r[key] / r["cells"] * 1e6 for r in self.reps if key in r and r["cells"]]
        return statistics.median(values) if values else float("nan")

    def rate(self) -> float:
        """Median cells/s (NaN without repetitions)."""
        values = [r["cells"] / r["seconds"] for r in self.reps]
        return statistics.median(values) if values else float("nan")

    def peak(self, key: str) -> float:
        """Highest value of a field over the repetitions (NaN when absent)."""
        values = [r[key] for r in self.reps if key in r]
        return max(values) if values else float("nan")


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


def store_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Path of each store key."""
    return {"lz4": args.annbatch_lz4, "none": args.annbatch_none, "annserve": args.store}


def loader_args(row: Row, args: argparse.Namespace, seed: int) -> list[str]:
    """Command-line options every worker shares."""
    out = [*loader_flags(args), "--seed", str(seed)]
    if not args.shuffle:
        out.append("--no-shuffle")
    if args.max_cells is not None:
        out += ["--max-cells", str(args.max_cells)]
    if row.epoch > 1:
        out += ["--warmup-epochs", str(row.epoch - 1)]
    if args.cold:
        out.append("--cold")
    return out


def worker_cmd(row: Row, args: argparse.Namespace, seed: int, daemon: Daemon | None) -> list[str]:
    """Command line of one repetition of ``row``."""
    store = store_paths(args)[row.store]
    if row.kind == "annbatch":
        return [
            str(args.annbatch_python),
            str(HERE / "annbatch_worker.py"),
            "run",
            "--collection",
            str(store),
            *loader_args(row, args, seed),
        ]
    cmd = [
        sys.executable,
        str(HERE / "loader_worker.py"),
        row.kind,
        *loader_args(row, args, seed),
    ]
    if row.kind == "remote":
        assert daemon is not None
        transport = {"shm": "shm", "tcp": "grpc", "bulk": "bulk"}[row.transport]
        return cmd + [
            "--address",
            daemon.addresses["shm" if transport == "shm" else "tcp"],
            "--transport",
            transport,
            "--encoding",
            "compact",
            "--server-pid",
            str(daemon.proc.pid),
        ]
    return cmd + ["--store", str(store), "--zarr-pipeline", args.zarr_pipeline]


class Daemons:
    """The daemons of the remote rows: one per row, so each peak RSS is its row's own.

    Rows on the ``lz4`` collection get a new daemon for every repetition (its
    decoded-chunk cache starts empty, as a first epoch's does); the others keep one
    for all their repetitions (uncompressed stores are never cached).
    """

    def __init__(self, args: argparse.Namespace, env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.sock_dir = Path(tempfile.mkdtemp(prefix="annserve-bench-"))
        self.kept: dict[str, Daemon] = {}

    def start(self, row: Row) -> Daemon:
        """Start a daemon for ``row``. Raises RuntimeError if it does not start."""
        unix = self.sock_dir / f"{row.key}.sock" if row.transport == "shm" else None
        if unix is not None:
            unix.unlink(missing_ok=True)
        store = store_paths(self.args)[row.store]
        flags = ["--zarr-pipeline", self.args.zarr_pipeline, "--log-level", "INFO"]
        return Daemon(store, flags, unix, env=self.env, timeout=120.0)

    def for_rep(self, row: Row) -> Daemon:
        """The daemon a repetition of ``row`` streams from."""
        if row.fresh_daemon:
            return self.start(row)
        if row.key not in self.kept:
            self.kept[row.key] = self.start(row)
        return self.kept[row.key]

    def done_with(self, row: Row, daemon: Daemon) -> None:
        """End of a repetition: stop a per-repetition daemon."""
        if row.fresh_daemon:
            daemon.stop()

    def stop_all(self) -> None:
        """Stop every daemon still running and remove the socket directory."""
        for d in self.kept.values():
            d.stop()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


def run_rep(
    result: RowResult, args: argparse.Namespace, seed: int, daemons: Daemons, env: dict[str, str]
) -> None:
    """Run one repetition of a row and record it (or the reason it failed)."""
    row = result.row
    daemon = None
    try:
        if row.kind == "remote":
            daemon = daemons.for_rep(row)
        rep = run_json(worker_cmd(row, args, seed, daemon), env, args.worker_timeout)
        if daemon is not None:
            rep["server_peak_mb"] = daemon.memory_mb("VmHWM")
            rep["server_rss_mb"] = daemon.memory_mb("VmRSS")
    except RuntimeError as e:
        print(f"  {row.key}: failed: {e}", flush=True)
        result.unavailable = result.unavailable or f"failed: {e}"
        return
    finally:
        if daemon is not None:
            daemons.done_with(row, daemon)
    result.reps.append(rep)
    print(
        f"  {row.key:<16} {rep['cells'] / rep['seconds']:>10,.0f} cells/s  "
        f"trainer {rep['cpu_s'] / rep['cells'] * 1e6:5.1f} µs/cell  "
        + (
            f"daemon {rep['server_cpu_s'] / rep['cells'] * 1e6:5.1f} µs/cell  "
            if "server_cpu_s" in rep
            else ""
        )
        + f"first batch {rep['first_batch_s']:.2f} s",
        flush=True,
    )


def annbatch_python_ok(args: argparse.Namespace) -> str:
    """Empty when annbatch's environment exists, else why its rows cannot run."""
    if args.annbatch_python.exists():
        return ""
    return f"unavailable: no annbatch environment at {args.annbatch_python} (see README.md)"


def prepare_stores(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """Build the stores that are missing from the atlas; return facts about the builds.

    annserve's store comes from ``annserve convert --compression none``; annbatch's two
    collections from ``annbatch_worker.py prepare`` (``add_adatas``), when its
    environment exists.

    Raises
    ------
    RuntimeError
        If a build fails.
    """
    facts: dict[str, Any] = {}
    if not args.store.exists():
        print(f"converting {args.atlas} -> {args.store} ...", flush=True)
        cmd = [sys.executable, "-m", "annserve.server.rpc.cli", "convert", str(args.atlas)]
        cmd += ["-o", str(args.store), "--compression", "none"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            msg = f"annserve convert failed: {done.stderr.strip()[-500:]}"
            raise RuntimeError(msg)
    if annbatch_python_ok(args):
        return facts
    worker = [str(args.annbatch_python), str(HERE / "annbatch_worker.py")]
    facts["versions"] = run_json([*worker, "info"], env, 300)
    for key, path in (("lz4", args.annbatch_lz4), ("none", args.annbatch_none)):
        if path.exists():
            continue
        print(f"building annbatch collection {path} ({key}) ...", flush=True)
        facts[key] = run_json(
            [*worker, "prepare", "--store", str(args.atlas), "--collection", str(path)]
            + ["--compressor", key, "--seed", str(args.seed)],
            env,
            1800,
        )
    return facts


def store_facts(store: Path) -> dict[str, Any]:
    """Shape and non-zeros of a store's X (h5ad, zarr or a collection), from metadata."""
    import h5py
    import zarr

    root: Any = h5py.File(store, "r") if store.is_file() else zarr.open_group(store, mode="r")
    xs: list[Any] = [root["X"]] if "X" in root else [g["X"] for _, g in root.groups()]
    return {
        "n_obs": sum(int(x.attrs["shape"][0]) for x in xs),
        "n_vars": int(xs[0].attrs["shape"][1]),
        "nnz": sum(int(x["data"].shape[0]) for x in xs),
        "bytes": sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        if store.is_dir()
        else store.stat().st_size,
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
    results: list[RowResult], args: argparse.Namespace, daemons: Daemons, env: dict[str, str]
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
    return "–" if math.isnan(value) else format(value, spec)


def reference(r: RowResult, results: list[RowResult]) -> tuple[RowResult | None, str]:
    """The row ``r`` is compared with, and its name in the ratio column.

    annbatch on the same store and epoch; on annserve's store (which annbatch cannot
    read as a collection), the in-memory bound. None for the references themselves.
    """
    if r.row.kind in ("annbatch", "scipy"):
        return None, ""
    for other in results:
        if r.row.store == "annserve" and other.row.kind == "scipy":
            return other, "in-memory"
        if (
            other.row.kind == "annbatch"
            and other.row.store == r.row.store
            and other.row.epoch == r.row.epoch
        ):
            return other, "annbatch"
    return None, ""


HEADER = (
    "loader",
    "store",
    "epoch",
    "cells/s",
    "trainer CPU µs/cell",
    "daemon CPU µs/cell",
    "first batch s",
    "trainer peak RSS MiB",
    "daemon peak RSS MiB",
    "same-store ratio",
    "trainer CPU ratio",
)


def table_rows(results: list[RowResult]) -> list[tuple[str, ...]]:
    """Cells of the table, one tuple per row, medians over repetitions."""
    out = []
    for r in results:
        head = (r.row.label, r.row.store, str(r.row.epoch))
        if not r.reps:
            out.append((*head, r.unavailable or "no result", *[""] * (len(HEADER) - 4)))
            continue
        ref, ref_name = reference(r, results)
        if ref is not None and ref.reps:
            ratio = f"{r.rate() / ref.rate():.2f}× {ref_name}"
            cpu_ratio = fmt(r.per_cell_us("cpu_s") / ref.per_cell_us("cpu_s"), ".2f") + "×"
        else:
            ratio = "reference" if r.row.kind in ("annbatch", "scipy") else "–"
            cpu_ratio = ""
        out.append(
            (
                *head,
                fmt(r.rate(), ",.0f"),
                fmt(r.per_cell_us("cpu_s"), ".1f"),
                fmt(r.per_cell_us("server_cpu_s"), ".1f"),
                fmt(r.median("first_batch_s"), ".2f"),
                fmt(r.peak("rss_peak_mb"), ",.0f"),
                fmt(r.peak("server_peak_mb"), ",.0f"),
                ratio,
                cpu_ratio,
            )
        )
    return out


def markdown_table(results: list[RowResult]) -> str:
    """The results as a markdown table (text columns left, figures right)."""
    rows = [HEADER, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    left = {0, 1}

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            "-" * (w + 2) if i in left else "-" * (w + 1) + ":" for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(HEADER), rule, *(line(row) for row in rows[1:])])


def notes(results: list[RowResult], args: argparse.Namespace, built: dict[str, Any]) -> list[str]:
    """What the table does not show: checksums, store paths, versions, unavailable rows."""
    out = []
    sums = [rep["checksum"] for r in results for rep in r.reps]
    if args.max_cells is None and sums:
        agree = max(sums) - min(sums) <= 1e-6 * max(abs(x) for x in sums)
        by_row = {r.row.key: [rep["checksum"] for rep in r.reps] for r in results if r.reps}
        verdict = "agree" if agree else f"DISAGREE: {by_row}"
        out.append(
            f"checksums (sum of all X values in an epoch, every row and repetition) {verdict}"
        )
    for key, path in store_paths(args).items():
        out.append(f"store {key}: {path} — {STORES[key]}")
    if v := built.get("versions"):
        out.append(
            f"annbatch {v['annbatch']} (anndata {v['anndata']}, zarr {v['zarr']}, "
            f"zarrs {v['zarrs']}, torch {v['torch']}), zarrs codec pipeline"
        )
    for key in ("lz4", "none"):
        if b := built.get(key):
            out.append(
                f"annbatch collection {key} built by add_adatas in {b['seconds']:.1f} s, "
                f"peak RSS {b['rss_peak_mb']:,.0f} MiB"
            )
    for r in results:
        if r.row.kind == "remote" and r.reps and not r.row.fresh_daemon:
            rss = ", ".join(f"{rep['server_rss_mb']:,.0f}" for rep in r.reps)
            out.append(f"{r.row.key}: daemon RSS after each repetition (MiB): {rss}")
    out.extend(f"{r.row.key}: {r.unavailable}" for r in results if r.unavailable)
    return out


def header(facts: dict[str, Any], args: argparse.Namespace, warmed_mib: float) -> str:
    """What was measured, on what."""
    order = "shuffled" if args.shuffle else "in order"
    cells = f"{args.max_cells:,} cells" if args.max_cells else "one epoch"
    cache = (
        "page cache dropped before each measured epoch"
        if args.cold
        else f"page cache warmed with {warmed_mib:,.0f} MiB"
    )
    return (
        f"atlas {args.atlas}: {facts['n_obs']:,} cells x {facts['n_vars']:,} genes, "
        f"{facts['nnz']:,} non-zeros ({facts['nnz'] / facts['n_obs']:,.0f} per cell)\n"
        f"{order}, batch_size {args.batch_size}, chunk_size {args.chunk_size}, "
        f"preload_nchunks {args.preload_nchunks}, X as torch sparse CSR float32; {cells} "
        f"per repetition, medians of {args.reps} interleaved repetitions; {os.cpu_count()} "
        f"CPUs (trainer and daemon share them); {cache}; daemon zarr pipeline "
        f"{args.zarr_pipeline}; annserve {git_state()}"
    )


#: Chart colours per loader kind/transport.
_COLOURS = {
    "annbatch": "#7f7f7f",
    "shm": "#1f77b4",
    "tcp": "#ff7f0e",
    "bulk": "#d62728",
    "sampler": "#2ca02c",
    "scipy": "#9467bd",
}


def write_chart(results: list[RowResult], path: Path, title: str) -> None:
    """Grouped bars: cells/s per store (top), trainer + daemon CPU µs/cell (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    done = [r for r in results if r.reps]
    groups: list[tuple[str, int]] = []
    for r in done:
        if (r.row.store, r.row.epoch) not in groups:
            groups.append((r.row.store, r.row.epoch))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
    ticks, names = [], []
    x = 0.0
    for store, epoch in groups:
        members = [r for r in done if (r.row.store, r.row.epoch) == (store, epoch)]
        start = x
        for r in members:
            colour = _COLOURS[r.row.transport or r.row.kind]
            top.bar(x, r.rate() / 1e3, color=colour, width=0.8)
            ref, ref_name = reference(r, results)
            if ref is not None and ref.reps:
                top.annotate(
                    f"{r.rate() / ref.rate():.2f}×",
                    (x, r.rate() / 1e3),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            trainer = r.per_cell_us("cpu_s")
            daemon = r.per_cell_us("server_cpu_s")
            bottom.bar(x, trainer, color=colour, width=0.8)
            if not math.isnan(daemon):
                bottom.bar(
                    x, daemon, bottom=trainer, color=colour, alpha=0.45, hatch="//", width=0.8
                )
            if ref is not None and ref.reps:
                bottom.annotate(
                    f"{trainer / ref.per_cell_us('cpu_s'):.2f}×",
                    (x, trainer + (0.0 if math.isnan(daemon) else daemon)),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            x += 1
        ticks.append((start + x - 1) / 2)
        names.append(store + ("" if epoch == 1 else f"\nepoch {epoch}"))
        x += 0.8
    top.set_ylabel("thousand cells/s")
    top.set_ylim(0, 1.6 * max(r.rate() for r in done) / 1e3)  # room for the legend
    top.set_title(
        title + "\nabove bars: × annbatch on the same store and epoch "
        "(annserve's store: × the in-memory bound)",
        fontsize=9,
    )
    bottom.set_ylabel("CPU µs per cell")
    bottom.set_title("above bars: trainer CPU per cell × the same reference's", fontsize=9)
    bottom.set_xticks(ticks, names)
    legend = [
        Patch(color=_COLOURS["annbatch"], label="annbatch Loader (in-process)"),
        Patch(color=_COLOURS["shm"], label="RemoteLoader same-host (shared memory)"),
        Patch(color=_COLOURS["tcp"], label="RemoteLoader TCP, gRPC stream (compact)"),
        Patch(color=_COLOURS["bulk"], label="RemoteLoader TCP, bulk channel (compact)"),
        Patch(color=_COLOURS["sampler"], label="daemon pipeline in-process"),
        Patch(color=_COLOURS["scipy"], label="whole X in memory (bound)"),
    ]
    top.legend(handles=legend, fontsize=8, loc="upper left")
    bottom.legend(
        handles=[
            Patch(facecolor="#bbbbbb", label="trainer process"),
            Patch(facecolor="#bbbbbb", alpha=0.45, hatch="//", label="daemon"),
        ],
        fontsize=8,
        loc="upper right",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--atlas",
        required=True,
        type=Path,
        help="AnnData store the three stores are built from (make_atlas.py)",
    )
    p.add_argument(
        "--store",
        type=Path,
        default=None,
        help="annserve's converted store (default: <atlas>_narrow.zarr beside the atlas; "
        "built with annserve convert --compression none when missing)",
    )
    p.add_argument(
        "--annbatch-lz4",
        type=Path,
        default=None,
        help="annbatch collection with add_adatas defaults (default: "
        "<atlas>.annbatch-lz4.zarr beside the atlas; built when missing)",
    )
    p.add_argument(
        "--annbatch-none",
        type=Path,
        default=None,
        help="uncompressed annbatch collection (default: <atlas>.annbatch-none.zarr; "
        "built when missing)",
    )
    add_loader_args(p, helps=True)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="read in order")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="repetitions per row, median reported (default 5, 1 with --quick)",
    )
    p.add_argument(
        "--max-cells", type=int, default=None, help="cells per repetition (default: one full epoch)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of repetition 1 (then +1 each)")
    p.add_argument(
        "--only", default=None, help="comma-separated rows to run: " + ",".join(r.key for r in ROWS)
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
        help="smoke run (~2-3 min): 1 repetition of 20,000 cells unless given otherwise",
    )
    p.add_argument(
        "--annbatch-python",
        type=Path,
        default=ANNBATCH_PYTHON,
        help="python of the annbatch environment (Python >= 3.12, annbatch 0.3.1)",
    )
    p.add_argument(
        "--zarr-pipeline",
        choices=sorted(ZARR_PIPELINES),
        default="zarrs",
        help="zarr codec pipeline of the daemon and of the in-process rows",
    )
    p.add_argument(
        "--worker-timeout", type=float, default=300.0, help="seconds one repetition may take"
    )
    p.add_argument(
        "--chart",
        type=Path,
        default=None,
        help="PNG chart to write (default: bench_loaders.png beside the atlas); the "
        "table goes beside it as .md",
    )
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    return p


def resolve_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line and fill in derived defaults."""
    args = build_parser().parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 5
    if args.quick and args.max_cells is None:
        args.max_cells = 20_000
    stem, parent = args.atlas.stem, args.atlas.parent
    args.store = args.store or parent / f"{stem}_narrow.zarr"
    args.annbatch_lz4 = args.annbatch_lz4 or parent / f"{stem}.annbatch-lz4.zarr"
    args.annbatch_none = args.annbatch_none or parent / f"{stem}.annbatch-none.zarr"
    args.chart = args.chart or parent / "bench_loaders.png"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write it and the chart; return the exit code."""
    args = resolve_args(argv)
    if args.cold and os.geteuid() != 0:
        print("--cold drops the page cache, which needs root", file=sys.stderr)
        return 2
    if not args.atlas.exists():
        print(f"no atlas at {args.atlas}: run benchmarks/make_atlas.py", file=sys.stderr)
        return 2
    keys = args.only.split(",") if args.only else [r.key for r in ROWS]
    unknown = sorted(set(keys) - {r.key for r in ROWS})
    if unknown:
        print(f"unknown rows {unknown}; rows: {[r.key for r in ROWS]}", file=sys.stderr)
        return 2
    results = [RowResult(r) for r in ROWS if r.key in keys]
    # every process alike: torch's OpenMP threads sleep between batches instead of spinning
    # (spinning takes a core from whatever loads the data: a daemon, zarrs' threads)
    env = passive_env()
    built = prepare_stores(args, env)
    no_annbatch = annbatch_python_ok(args)
    for r in results:
        if r.row.kind == "annbatch" and no_annbatch:
            r.unavailable = no_annbatch
        elif not store_paths(args)[r.row.store].exists():
            r.unavailable = f"unavailable: no store at {store_paths(args)[r.row.store]}"
    facts = store_facts(args.store)
    stores = sorted({store_paths(args)[r.row.store] for r in results if not r.unavailable})
    warmed = 0.0 if args.cold else warm_page_cache(stores)
    daemons = Daemons(args, env)
    try:
        run_all(results, args, daemons, env)
    finally:
        daemons.stop_all()
    title = header(facts, args, warmed)
    table = markdown_table(results)
    lines = notes(results, args, built)
    print("\n" + title + "\n")
    print(table + "\n")
    print("\n".join(f"- {n}" for n in lines))
    chart_title = (
        f"{facts['n_obs']:,} cells × {facts['n_vars']:,} genes, "
        f"{facts['nnz'] / facts['n_obs']:,.0f} non-zeros/cell; batch {args.batch_size}, "
        f"chunk {args.chunk_size} × preload {args.preload_nchunks}, shuffled; "
        f"medians of {args.reps}; {os.cpu_count()} CPUs shared by trainer and daemon"
    )
    write_chart(results, args.chart, chart_title)
    md = args.chart.with_suffix(".md")
    md.write_text(title + "\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in lines) + "\n")
    print(f"\nchart: {args.chart}\ntable: {md}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "atlas": facts,
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "stores": {k: str(v) for k, v in store_paths(args).items()},
                    "built": built,
                    "rows": {
                        r.row.key: {
                            "label": r.row.label,
                            "store": r.row.store,
                            "epoch": r.row.epoch,
                            "reps": r.reps,
                            "unavailable": r.unavailable,
                        }
                        for r in results
                    },
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
