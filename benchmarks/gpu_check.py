"""GPU delivery benchmark: one epoch delivered as device tensors, per delivery path.

Run by ``gpu_check.sh`` on a machine with a GPU; ``--device cpu`` is a dry mode that
runs the same code on the CPU (the device-assembly path against the CPU path), so the
script is tested where there is no GPU.

``run`` (annserve's environment) times, on a daemon it starts (``annserve --store``,
TCP, or with ``--transport shm`` a unix socket), one epoch of ``RemoteLoader`` per row:

``device-csr``
    ``Output(device=D, assemble_on_device=True)``: narrow upload, CSR built on D.
``device-cupy``
    the same, yielded as ``cupyx.scipy.sparse.csr_matrix`` (CUDA and cupy only).
``cpu-then-to``
    ``Output(device=D, assemble_on_device=False)``: widened on the CPU, then
    ``.to(D, non_blocking=True)`` (the path before device assembly).

``annbatch`` (annbatch's Python >= 3.12 environment) times annbatch's ``Loader`` with
``preload_to_gpu=True`` over its own collection of the same atlas.

Each row prints one JSON line: cells/s, H2D bytes per cell (X: values, indices and
row offsets as moved to the device), host CPU µs per cell (this process: decoding,
widening, the loop's thread; the daemon's CPU is not counted), peak device memory
(MiB; CUDA only). ``table`` prints the rows of a JSON-lines file as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from _measure import cpu_seconds

HERE = Path(__file__).resolve().parent


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _x_bytes(x: Any) -> int:
    """Bytes of a torch batch's X as it lies on the device (what ``.to`` moved)."""
    import torch

    if x.layout == torch.sparse_csr:
        parts = (x.values(), x.col_indices(), x.crow_indices())
        return sum(t.numel() * t.element_size() for t in parts)
    return x.numel() * x.element_size()


def run_row(address: str, row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time one epoch (at most ``args.max_cells`` cells) of one row; return its figures."""
    import torch

    from annserve.client import Connection, Output, RemoteLoader

    device = torch.device(args.device)
    output = Output(
        device=device,
        assemble_on_device=row != "cpu-then-to",
        cupy=row == "device-cupy",
        to_dense=args.to_dense,
    )
    loader = RemoteLoader(
        address,
        batch_size=args.batch_size,
        seed=args.seed,
        output=output,
        connection=Connection(transport="shm" if args.transport == "shm" else "grpc"),
    )
    for _ in zip(range(2), loader, strict=False):  # warm: buffers, CUDA context, caches
        pass
    loader.set_epoch(1)
    before = dict(loader.upload_stats)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    cells, moved = 0, 0
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for batch in loader:
        x = batch["X"]
        if row == "cpu-then-to":
            moved += _x_bytes(x)
        cells += int(x.shape[0])
        if cells >= args.max_cells:
            break
    _sync(device)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if row != "cpu-then-to":
        moved = loader.upload_stats["bytes"] - before["bytes"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "row": row,
        "device": str(device),
        "cells": cells,
        "seconds": round(seconds, 3),
        "cells_per_s": round(cells / seconds),
        "h2d_bytes_per_cell": round(moved / max(cells, 1), 1),
        "host_cpu_us_per_cell": round(cpu / max(cells, 1) * 1e6, 2),
        "peak_device_mib": None if peak is None else round(peak, 1),
    }


def cmd_run(args: argparse.Namespace) -> int:
    """Start a daemon on ``args.store`` and time each row; print a JSON line per row."""
    import torch
    from _daemon import Daemon

    from annserve.client._device import cupy_available

    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)
    rows = ["device-csr", "cpu-then-to"]
    if torch.device(args.device).type == "cuda" and cupy_available():
        rows.insert(1, "device-cupy")
    sock = Path(tempfile.mkdtemp(prefix="annserve-gpu-")) / "d.sock"
    flags = ["--zarr-pipeline", "zarrs", "--log-level", "INFO"]
    daemon = Daemon(args.store, flags, sock if args.transport == "shm" else None, timeout=120.0)
    try:
        address = daemon.address
        for row in rows:
            for rep in range(args.reps):
                out = run_row(address, row, args)
                out["row"], out["rep"] = f"{row} ({args.transport})", rep
                print(json.dumps(out), flush=True)
    finally:
        daemon.stop()
    return 0


def cmd_annbatch(args: argparse.Namespace) -> int:
    """Time annbatch's ``Loader(preload_to_gpu=True)`` over its collection; one JSON line."""
    import numpy as np
    import torch
    from annbatch import DatasetCollection, Loader
    from annbatch_worker import use_zarrs, x_only

    use_zarrs()
    device = torch.device("cuda")
    out: dict[str, Any] = {"row": "annbatch-preload_to_gpu", "device": str(device)}
    loader = Loader(
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        shuffle=True,
        rng=np.random.default_rng(args.seed),
        to="torch",
        preload_to_gpu=True,
    ).use_collection(DatasetCollection(args.collection, mode="r"), load_adata=x_only)
    for _ in zip(range(2), loader, strict=False):
        pass
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    cells = 0
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for batch in loader:
        x = batch["X"] if isinstance(batch, dict) else batch[0]
        cells += int(x.shape[0])
        if cells >= args.max_cells:
            break
    torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    out.update(
        cells=cells,
        seconds=round(seconds, 3),
        cells_per_s=round(cells / seconds),
        h2d_bytes_per_cell=None,  # annbatch moves its preload buffers: not counted here
        host_cpu_us_per_cell=round(cpu / max(cells, 1) * 1e6, 2),
        peak_device_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
    )
    print(json.dumps(out), flush=True)
    return 0


COLUMNS = (
    ("row", "row"),
    ("device", "device"),
    ("cells_per_s", "cells/s"),
    ("h2d_bytes_per_cell", "H2D B/cell"),
    ("host_cpu_us_per_cell", "host CPU us/cell"),
    ("peak_device_mib", "peak dev MiB"),
)


def table(records: list[dict[str, Any]]) -> str:
    """Return a Markdown table of the rows, the median of each row's repetitions."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_row.setdefault(r["row"], []).append(r)
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for reps in by_row.values():
        reps = sorted(reps, key=lambda r: r.get("cells_per_s") or 0)
        median = reps[len(reps) // 2]
        cells = [median.get(key) for key, _ in COLUMNS]
        lines.append("| " + " | ".join("–" if v is None else str(v) for v in cells) + " |")
    return "\n".join(lines)


def cmd_table(args: argparse.Namespace) -> int:
    """Print the table of a JSON-lines file (lines that are not JSON objects skipped)."""
    records = []
    for line in Path(args.results).read_text().splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and "row" in value:
            records.append(value)
    print(table(records))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="annserve rows on a daemon serving --store")
    r.add_argument("--store", required=True, type=Path)
    r.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (dry mode)")
    r.add_argument("--transport", choices=["tcp", "shm"], default="tcp")
    r.add_argument("--to-dense", action="store_true")
    r.add_argument("--reps", type=int, default=3, help="repetitions per row (median shown)")
    a = sub.add_parser("annbatch", help="annbatch preload_to_gpu row (annbatch's environment)")
    a.add_argument("--collection", required=True, type=Path)
    a.add_argument("--chunk-size", type=int, default=32)
    a.add_argument("--preload-nchunks", type=int, default=256)
    for s in (r, a):
        s.add_argument("--batch-size", type=int, default=4096)
        s.add_argument("--max-cells", type=int, default=10**9, help="stop an epoch after these")
        s.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table", help="print the table of a JSON-lines results file")
    t.add_argument("results", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; return its exit code."""
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "annbatch": cmd_annbatch, "table": cmd_table}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
