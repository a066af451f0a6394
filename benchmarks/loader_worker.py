"""One benchmark repetition of one loader, in a fresh process; prints a JSON line.

Run by ``bench_loaders.py`` (each repetition in its own process, so that peak
RSS is the loader's own). Kinds:

``remote``
    annserve ``RemoteLoader`` against a running daemon (``--address``): over shared
    memory (``--transport shm``, a ``unix:`` address) or the gRPC stream
    (``--transport grpc``), in ``--encoding`` (default compact).
``sampler``
    The daemon's pipeline in-process, no gRPC: ``open_store`` + ``ChunkSampler``
    preload buffers + ``store.read_rows``, values widened to float32 and indices to
    int32 once per preload buffer (as the client does), each batch built as a torch
    sparse CSR tensor.
``scipy``
    The whole X loaded into a scipy CSR matrix (float32 values, int32 indices), a
    random permutation of the rows, fancy-indexed batches converted to torch sparse
    CSR (the upper bound).

Every kind yields float32 values, so the epoch checksums of all kinds and stores agree.

Each kind imports only what it needs, so the RSS after imports is comparable.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from _daemon import add_loader_args
from _measure import emit, measure

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import scipy.sparse as sp

    from annserve.server.io.store import Store
    from annserve.server.plan.sampler import Sampler


def csr_tensor(m: sp.csr_matrix) -> torch.Tensor:
    """Wrap a scipy CSR matrix as a torch sparse CSR tensor, sharing its memory."""
    return torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr),
        torch.from_numpy(m.indices),
        torch.from_numpy(m.data),
        size=m.shape,
        check_invariants=False,
    )


def run_remote(args: argparse.Namespace) -> dict[str, Any]:
    """Consume batches from an annserve daemon through ``RemoteLoader``."""
    from annserve.client import Connection, Output, RemoteLoader

    def setup() -> Callable[[int], RemoteLoader]:
        loader = RemoteLoader(
            args.address,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            preload_nchunks=args.preload_nchunks,
            shuffle=args.shuffle,
            seed=args.seed,
            connection=Connection(
                transport=args.transport,
                encoding=args.encoding,
            ),
            output=Output(to_torch=True),
        )

        def epoch(i: int) -> RemoteLoader:
            loader.set_epoch(i)  # from its start, also after a --max-cells break
            return loader

        return epoch

    return measure(setup, args.max_cells, args.warmup_epochs, args.server_pid, cold=args.cold)


def sampler_batches(
    store: Store, sampler: Sampler, batch_size: int, epoch: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the epoch's batches as the daemon cuts them, built in-process.

    Each preload buffer is read with one sorted ``read_rows`` call and its rows are
    gathered in the sampler's order; rows left over at the end of a buffer open
    the next batch.

    Yields
    ------
    ``{"X": tensor}``, X of shape ``(batch_size, n_vars)`` (the last may be shorter),
    float32 values, int32 indices.
    """
    import scipy.sparse as sp

    from annserve.server.io.matrix import CSRRows

    pending: list[sp.csr_matrix] = []
    n_pending = 0
    for rows in sampler.preloads(epoch):
        sorted_rows = np.sort(rows)
        buf = store.read_rows(sorted_rows)
        assert isinstance(buf, CSRRows), "the benchmark stores hold CSR X"
        data = buf.data.astype(np.float32, copy=False)  # uint16 counts of annserve's stores
        indices = buf.indices.astype(np.int32, copy=False)
        m = sp.csr_matrix((data, indices, buf.indptr), shape=(len(rows), store.n_vars))
        order = np.searchsorted(sorted_rows, rows)
        start = 0
        while start < len(order):
            take = min(batch_size - n_pending, len(order) - start)
            pending.append(m[order[start : start + take]])
            n_pending += take
            start += take
            if n_pending == batch_size:
                yield {"X": csr_tensor(_stack(pending))}
                pending, n_pending = [], 0
    if pending:
        yield {"X": csr_tensor(_stack(pending))}


def _stack(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
    import scipy.sparse as sp

    return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")


def use_pipeline(name: str) -> None:
    """Select the zarr codec pipeline as ``annserve --zarr-pipeline NAME`` does."""
    import zarr

    paths = {
        "zarrs": "zarrs.ZarrsCodecPipeline",
        "zarr-python": "zarr.core.codec_pipeline.BatchedCodecPipeline",
    }
    zarr.config.set({"codec_pipeline.path": paths[name]})


def daemon_sampler(store: Store, args: argparse.Namespace) -> Sampler:
    """Build the sampler the daemon builds for the same ``StreamBatches`` request."""
    from annserve.server.plan.request import plan_stream
    from annserve.v1 import annserve_pb2 as pb

    request = pb.StreamBatchesRequest(
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        shuffle=args.shuffle,
        seed=args.seed,
    )
    from annserve.server.plan.selection import make_sampler

    return make_sampler(store, plan_stream(request, store))


def run_sampler(args: argparse.Namespace) -> dict[str, Any]:
    """Consume batches of the in-process sampler pipeline (no gRPC)."""
    import scipy.sparse  # noqa: F401  (imported before the RSS baseline)

    from annserve.server.io.store import open_store

    use_pipeline(args.zarr_pipeline)

    def setup() -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
        store = open_store(args.store)
        sampler = daemon_sampler(store, args)
        return lambda epoch: sampler_batches(store, sampler, args.batch_size, epoch=epoch)

    return measure(setup, args.max_cells, args.warmup_epochs, cold=args.cold)


def scipy_batches(
    x: sp.csr_matrix, batch_size: int, shuffle: bool, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield fancy-indexed batches of an in-memory CSR matrix, in a random row order."""
    n = x.shape[0]
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        yield {"X": csr_tensor(x[order[start : start + batch_size]])}


def run_scipy(args: argparse.Namespace) -> dict[str, Any]:
    """Consume batches fancy-indexed from X held in memory (the upper bound)."""
    import anndata as ad
    import h5py
    import scipy.sparse as sp
    import zarr

    use_pipeline(args.zarr_pipeline)

    def setup() -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
        root = (
            h5py.File(args.store, "r")
            if Path(args.store).is_file()
            else zarr.open_group(args.store, mode="r")
        )
        groups = [root] if "X" in root else [g for _, g in sorted(root.groups())]
        x = sp.vstack([ad.io.read_elem(g["X"]) for g in groups], format="csr")
        # anndata keeps the on-disk int64 indptr next to int32 indices; scipy then
        # converts the whole index arrays on every fancy-indexing call (~0.2 s per
        # batch here). Re-wrapping makes both int32, as scipy builds them itself;
        # annserve's stores hold uint16 counts, served as float32 by every other row.
        data = x.data.astype(np.float32, copy=False)
        x = sp.csr_matrix((data, x.indices.astype(np.int32), x.indptr), shape=x.shape)
        return lambda epoch: scipy_batches(x, args.batch_size, args.shuffle, args.seed + epoch)

    return measure(setup, args.max_cells, args.warmup_epochs, cold=args.cold)


RUNNERS = {"remote": run_remote, "sampler": run_sampler, "scipy": run_scipy}


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description="One repetition of one loader; prints JSON.")
    p.add_argument("kind", choices=sorted(RUNNERS))
    p.add_argument("--address", help="daemon address, host:port or unix:PATH (remote)")
    p.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the daemon's pid: its CPU over the measured epoch is reported (remote)",
    )
    p.add_argument(
        "--transport",
        default="grpc",
        choices=["auto", "shm", "bulk", "grpc"],
        help="Connection(transport=...): shm needs a unix: address (remote)",
    )
    p.add_argument(
        "--encoding",
        default="compact",
        choices=["compact", "native", "raw"],
        help="Connection(encoding=...) (remote)",
    )
    p.add_argument("--store", help="AnnData store (sampler, scipy)")
    p.add_argument(
        "--zarr-pipeline",
        default="zarrs",
        choices=["zarrs", "zarr-python"],
        help="zarr codec pipeline (sampler, scipy)",
    )
    add_loader_args(p)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cells", type=int, default=None)
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="epochs consumed, unmeasured, before the measured one",
    )
    p.add_argument(
        "--cold", action="store_true", help="drop the page cache before the measured epoch (root)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one repetition and print its JSON result; return the exit code."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state", UserWarning)
    emit(RUNNERS[args.kind](args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
