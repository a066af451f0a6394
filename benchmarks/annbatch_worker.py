"""annbatch side of the loader benchmark; runs in its own Python >= 3.12 environment.

annbatch 0.3.1 needs Python >= 3.12 while annserve's environment is 3.11, so
``bench_loaders.py`` runs this script with ``benchmarks/.venv-annbatch/bin/python``
(see README.md). Every command prints one JSON line as the last line of stdout.

``prepare``
    Build annbatch's own preshuffled collection from the benchmark store with
    ``DatasetCollection.add_adatas`` (its documented preprocessing step): with its
    defaults (Blosc LZ4, ``--compressor lz4``) or uncompressed (``--compressor none``:
    ``zarr_compressor=()``).
``run``
    One repetition: annbatch ``Loader`` over that collection, shuffled (annbatch's
    ``RandomSampler`` chunk sampler: contiguous chunks in random order, rows
    shuffled within each preload), ``to="torch"``, CPU, zarrs codec pipeline as
    annbatch documents for local filesystems.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import zarr
from _measure import emit, measure, proc_status_mb

if TYPE_CHECKING:
    from collections.abc import Callable

    from annbatch import Loader


def use_zarrs() -> None:
    """Select the zarrs codec pipeline, as annbatch's README requires for local disks."""
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})


def x_only(group: zarr.Group) -> ad.AnnData:
    """Back X by the store and keep no obs columns, so batches carry X alone.

    The annserve rows request no obs columns either; annbatch's default loader
    would also slice obs for every batch.
    """
    var = group["var"]
    names = ad.io.read_elem(var[var.attrs.get("_index")])
    return ad.AnnData(X=ad.io.sparse_dataset(group["X"]), var=pd.DataFrame(index=names))


def collection_n_obs(path: Path) -> int:
    """Cells in an existing annbatch collection (0 when there is none)."""
    from annbatch import DatasetCollection

    if not path.exists():
        return 0
    collection = DatasetCollection(path, mode="r")
    if collection.is_empty:
        return 0
    return sum(int(g["X"].attrs["shape"][0]) for g in collection)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Preshuffle the store into an annbatch collection at ``args.collection``."""
    from annbatch import DatasetCollection

    use_zarrs()
    t0 = time.perf_counter()
    options: dict[str, Any] = {} if args.compressor == "lz4" else {"zarr_compressor": ()}
    DatasetCollection(args.collection, mode="w").add_adatas(
        [args.store],
        dataset_size=args.dataset_size,
        rng=np.random.default_rng(args.seed),
        **options,
    )
    return {
        "seconds": time.perf_counter() - t0,
        "n_obs": collection_n_obs(args.collection),
        "rss_peak_mb": proc_status_mb("VmHWM"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time one epoch (or ``max_cells``) of annbatch's ``Loader`` over the collection."""
    from annbatch import DatasetCollection, Loader

    use_zarrs()

    def setup() -> Callable[[int], Loader]:
        loader = Loader(
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            preload_nchunks=args.preload_nchunks,
            shuffle=args.shuffle,
            rng=np.random.default_rng(args.seed),
            to="torch",
            preload_to_gpu=False,
        )
        loader = loader.use_collection(
            DatasetCollection(args.collection, mode="r"), load_adata=x_only
        )
        return lambda _: loader  # each iteration is a new epoch, reshuffled by its rng

    return measure(setup, args.max_cells, args.warmup_epochs, cold=args.cold)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description="annbatch loader benchmark worker; prints JSON.")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="build the preshuffled collection")
    prep.add_argument("--store", required=True, type=Path, help="source AnnData store")
    prep.add_argument("--collection", required=True, type=Path, help="collection to write")
    prep.add_argument(
        "--dataset-size",
        default="2GB",
        help="uncompressed size of each shuffled dataset (default %(default)s)",
    )
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument(
        "--compressor",
        choices=["lz4", "none"],
        default="lz4",
        help="lz4: add_adatas' default zarr_compressor (Blosc LZ4); none: zarr_compressor=()",
    )
    r = sub.add_parser("run", help="time one repetition")
    r.add_argument("--collection", required=True, type=Path)
    r.add_argument("--batch-size", type=int, default=4096)
    r.add_argument("--chunk-size", type=int, default=32)
    r.add_argument("--preload-nchunks", type=int, default=256)
    r.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-cells", type=int, default=None)
    r.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="epochs consumed, unmeasured, before the measured one",
    )
    r.add_argument(
        "--cold", action="store_true", help="drop the page cache before the measured epoch (root)"
    )
    info = sub.add_parser("info", help="report the installed versions and a collection's size")
    info.add_argument("--collection", type=Path, default=None)
    return p


def report_info(args: argparse.Namespace) -> dict[str, Any]:
    """Versions of annbatch and its I/O stack, and the collection's cells."""
    from importlib.metadata import version

    out = {pkg: version(pkg) for pkg in ("annbatch", "anndata", "zarr", "zarrs", "torch")}
    if args.collection is not None:
        out["n_obs"] = collection_n_obs(args.collection)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command and print its JSON result; return the exit code."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)
    commands = {"prepare": prepare, "run": run, "info": report_info}
    emit(commands[args.command](args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
