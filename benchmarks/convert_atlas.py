"""Benchmark ``annserve convert`` on a generated atlas-shaped set of ``.h5ad`` files.

Generates ``--n-files`` files (default 8 x 125,000 cells = 1M cells, 20,000 genes,
~1,500 non-zeros per cell) into ``--workdir``, then runs ``annserve convert`` on them
in a subprocess and reports its wall time, cells/s and peak RSS.

The generated files look like a raw atlas before shuffling: every file is a few
batches, the cells of a batch are contiguous and grouped by cell type, and obs holds
categorical ``batch`` and ``cell_type`` and a float ``n_counts``. Each file drops
~0.5% of the shared genes and adds a few of its own (at the end of its var), so the
outer join reorders genes and rows must be re-sorted. Counts are integers stored as
float32 CSR (int32 indices, int64 indptr), mostly 1-3, boosted on each cell type's
marker genes; the genes a cell expresses are a uniform random subset (drawn as
geometric gaps, so rows come out sorted) - realistic sizes, not realistic biology.
Files are written block by block with h5py, so generation memory stays bounded.

Example
-------
    python benchmarks/convert_atlas.py --n-obs 100000
    python benchmarks/convert_atlas.py            # 1M cells, ~12 GB of input
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from make_atlas import disk_bytes

from annserve.server.convert import read_manifest

#: Cells generated and written per step.
BLOCK_CELLS = 4096
#: Cells drawn together in the geometric-gap sampler.
DRAW_CELLS = 256
#: Shared genes each file drops, and genes of its own it adds.
DROP_SHARE, EXTRA_GENES = 0.005, 20
#: Marker genes per cell type and the factor their counts are multiplied by.
N_MARKERS, MARKER_BOOST = 400, 3.0
N_TYPES, BATCHES_PER_FILE = 12, 2


def file_genes(n_vars: int, k: int, rng: np.random.Generator) -> list[str]:
    """Gene names of file ``k``: the shared genes minus a few, plus its own at the end."""
    width = len(str(n_vars - 1))
    keep = np.sort(rng.choice(n_vars, n_vars - int(DROP_SHARE * n_vars), replace=False))
    return [f"GENE{i:0{width}d}" for i in keep] + [f"F{k}_GENE{j}" for j in range(EXTRA_GENES)]


def file_obs(n_obs: int, k: int, rng: np.random.Generator) -> pd.DataFrame:
    """obs of file ``k``: batches contiguous, cell types contiguous within a batch."""
    share = rng.dirichlet(np.full(BATCHES_PER_FILE * N_TYPES, 2.0))
    counts = rng.multinomial(n_obs, share)
    group = np.repeat(np.arange(len(counts)), counts)
    batches = [f"file{k}_batch{b}" for b in range(BATCHES_PER_FILE)]
    return pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(group // N_TYPES, batches),
            "cell_type": pd.Categorical.from_codes(
                group % N_TYPES, [f"type_{t:02d}" for t in range(N_TYPES)]
            ),
        },
        index=pd.Index([f"f{k}_cell{i:07d}" for i in range(n_obs)]),
    )


def draw_rows(
    types: np.ndarray, markers: np.ndarray, nnz_per_cell: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw CSR rows: a uniform random gene subset per cell, in gene order, integer counts.

    Parameters
    ----------
    types
        Cell type of each cell, shape ``(n_cells,)``.
    markers
        Whether each gene is a marker of each type, shape ``(N_TYPES, n_genes)``, bool.
    nnz_per_cell
        Mean non-zeros per cell.
    rng
        Generator to draw from.

    Returns
    -------
    ``row_nnz`` (int64, ``(n_cells,)``), ``indices`` (int32) and ``data`` (float32).
    """
    n_cells, n_genes = len(types), markers.shape[1]
    p = np.clip(nnz_per_cell / n_genes * rng.lognormal(0.0, 0.2, n_cells), 1e-4, 0.5)
    row_nnz = np.zeros(n_cells, dtype=np.int64)
    parts_idx, parts_val = [], []
    for a in range(0, n_cells, DRAW_CELLS):
        pc = p[a : a + DRAW_CELLS]
        k = int(pc.max() * n_genes * 1.15 + 64)  # enough gaps to pass the last gene
        genes = np.cumsum(rng.geometric(pc[:, None], (len(pc), k)), axis=1) - 1
        inside = genes < n_genes
        row_nnz[a : a + len(pc)] = inside.sum(axis=1)
        g = genes[inside].astype(np.int32)
        values = rng.geometric(0.55, len(g)).astype(np.float32)
        boost = markers[np.repeat(types[a : a + len(pc)], row_nnz[a : a + len(pc)]), g]
        values[boost] = np.rint(values[boost] * MARKER_BOOST)
        parts_idx.append(g)
        parts_val.append(values)
    return row_nnz, np.concatenate(parts_idx), np.concatenate(parts_val)


def write_file(path: Path, n_obs: int, n_vars: int, nnz_per_cell: int, k: int, seed: int) -> int:
    """Write one generated ``.h5ad``; return its non-zeros."""
    rng = np.random.default_rng([seed, k])
    genes = file_genes(n_vars, k, rng)
    obs = file_obs(n_obs, k, rng)
    table = np.zeros((N_TYPES, len(genes)), dtype=bool)
    for t in range(N_TYPES):
        table[t, rng.choice(len(genes), N_MARKERS, replace=False)] = True
    types = obs["cell_type"].cat.codes.to_numpy()
    n_counts = np.zeros(n_obs, dtype=np.float32)
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "/", ad.AnnData(obs=obs, var=pd.DataFrame(index=genes)))
        x = f.create_group("X")
        x.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": (n_obs, len(genes)),
            }
        )
        data = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(1 << 18,))
        indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(1 << 18,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for a in range(0, n_obs, BLOCK_CELLS):
            b = min(a + BLOCK_CELLS, n_obs)
            row_nnz, idx, val = draw_rows(types[a:b], table, nnz_per_cell, rng)
            start = data.shape[0]
            for ds, values in ((data, val), (indices, idx)):
                ds.resize((start + len(values),))
                ds[start:] = values
            indptr.append(start + np.cumsum(row_nnz))
            n_counts[a:b] = np.bincount(
                np.repeat(np.arange(b - a), row_nnz), weights=val, minlength=b - a
            )
        x.create_dataset("indptr", data=np.concatenate(indptr))
        del f["obs"]
        ad.io.write_elem(f, "obs", obs.assign(n_counts=n_counts))
        return int(data.shape[0])


def generate(
    directory: Path, n_obs: int, n_files: int, n_vars: int, nnz_per_cell: int, seed: int
) -> tuple[list[Path], int]:
    """Write the input files; return their paths and total non-zeros."""
    sizes = np.full(n_files, n_obs // n_files)
    sizes[: n_obs % n_files] += 1
    paths, nnz = [], 0
    for k, size in enumerate(sizes.tolist()):
        t0 = time.perf_counter()
        paths.append(directory / f"atlas_part{k}.h5ad")
        nnz += write_file(paths[-1], size, n_vars, nnz_per_cell, k, seed)
        print(
            f"  generated {paths[-1].name}: {size:,} cells in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    return paths, nnz


def run_convert(inputs: list[Path], output: Path, extra: list[str]) -> dict[str, float]:
    """Run ``annserve convert`` in a subprocess; return wall seconds and its peak RSS (MB)."""
    cmd = [
        sys.executable,
        "-m",
        "annserve.server.rpc.cli",
        "convert",
        *map(str, inputs),
        "-o",
        str(output),
        *extra,
    ]
    print("  $", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = subprocess.run(cmd, check=False).returncode
    seconds = time.perf_counter() - t0
    if code != 0:
        msg = f"annserve convert exited with {code}"
        raise SystemExit(msg)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the only child
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where to generate the inputs and the collection (default %(default)s)",
    )
    p.add_argument("--n-obs", type=int, default=1_000_000, help="cells (default %(default)s)")
    p.add_argument("--n-files", type=int, default=8, help="input files (default %(default)s)")
    p.add_argument("--n-vars", type=int, default=20_000, help="shared genes (default %(default)s)")
    p.add_argument(
        "--nnz-per-cell",
        type=int,
        default=1_500,
        help="mean non-zeros per cell (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="generation seed (default %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument(
        "convert_args",
        nargs="*",
        metavar="-- ARGS",
        help="extra arguments for annserve convert (after --)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Generate, convert, report; return the exit code."""
    args = build_parser().parse_args(argv)
    need = args.n_obs * args.nnz_per_cell * 8 * 2.8  # inputs + spill + output, bytes
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        print(f"need ~{need / 1e9:.0f} GB free in {args.workdir}, have {free / 1e9:.0f} GB")
        return 1
    directory = Path(tempfile.mkdtemp(prefix="convert_atlas_", dir=args.workdir))
    try:
        print(
            f"generating {args.n_obs:,} cells x {args.n_vars:,} genes, ~{args.nnz_per_cell:,} "
            f"nnz/cell, {args.n_files} files -> {directory}",
            flush=True,
        )
        t0 = time.perf_counter()
        inputs, nnz = generate(
            directory, args.n_obs, args.n_files, args.n_vars, args.nnz_per_cell, args.seed
        )
        gen_s = time.perf_counter() - t0
        in_bytes = sum(disk_bytes(p) for p in inputs)
        output = directory / "collection.zarr"
        stats = run_convert(inputs, output, ["--no-progress", *args.convert_args])
        manifest = read_manifest(output)
        result = {
            "cells": manifest.n_obs,
            "genes": manifest.n_vars,
            "nnz": nnz,
            "groups": len(manifest.groups),
            "input_gb": in_bytes / 1e9,
            "output_gb": disk_bytes(output) / 1e9,
            "generate_s": gen_s,
            **stats,
            "cells_per_s": manifest.n_obs / stats["seconds"],
        }
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(
        f"converted {result['cells']:,} cells ({nnz / result['cells']:,.0f} nnz/cell, "
        f"{result['input_gb']:.2f} GB h5ad) into {result['groups']} groups "
        f"({result['output_gb']:.2f} GB) in {result['seconds']:.1f} s: "
        f"{result['cells_per_s']:,.0f} cells/s, peak RSS {result['peak_rss_mb']:,.0f} MB"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
