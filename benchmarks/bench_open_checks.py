"""Cost of the start-up check that every CSR chunk ``indptr`` needs is stored.

``open_store`` refuses a store whose ``X/data`` or ``X/indices`` lacks chunks (zarr
would read them as zeros). The check lists keys (and reads shard indexes); it never
reads data. This writes a real dataset with many small chunks in each zarr layout and
prints the time of the check per array and of the whole ``open_store``.

Usage: ``python benchmarks/bench_open_checks.py [--data PATH] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import time
import warnings
from pathlib import Path

import anndata as ad
import zarr

from annserve.server.io.ranges import check_stored
from annserve.server.io.store import open_store

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc3k_raw.h5ad"
#: (name, zarr format, dataset kwargs of X's arrays)
LAYOUTS = [
    ("zarr v3, 200-value chunks", 3, {"chunks": (200,)}),
    ("zarr v2, 200-value chunks", 2, {"chunks": (200,)}),
    (
        "zarr v3, 200-value chunks in 20,000-value shards",
        3,
        {"chunks": (200,), "shards": (20_000,)},
    ),
]


def main() -> None:
    """Write each layout, time the checks, print one row per array."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an .h5ad with CSR X")
    p.add_argument("--out", type=Path, default=Path("/tmp/annserve-open-checks"))
    args = p.parse_args()
    src = ad.read_h5ad(args.data)
    slim = ad.AnnData(X=src.X, obs=src.obs, var=src.var)
    for name, zarr_format, kwargs in LAYOUTS:
        path = args.out / f"v{zarr_format}-{len(kwargs)}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr's notes on v3 string dtypes
            ad.io.write_elem(root, "/", slim, dataset_kwargs=kwargs)
        root = zarr.open_group(path, mode="r")
        nnz = int(root["X/indptr"][-1])
        for key in ("data", "indices"):
            array = root[f"X/{key}"]
            started = time.perf_counter()
            check_stored(array, nnz, key)
            took = time.perf_counter() - started
            files = -(-nnz // (array.shards or array.chunks)[0])
            chunks = -(-nnz // array.chunks[0])
            print(
                f"{args.data.name} | {name} | X/{key} | {files:,} files, {chunks:,} chunks | "
                f"check {took * 1e3:.0f} ms"
            )
        started = time.perf_counter()
        open_store(path)
        print(
            f"{args.data.name} | {name} | open_store {(time.perf_counter() - started) * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
