"""Generate a synthetic, atlas-shaped AnnData store for the loader benchmarks.

Cells come in contiguous blocks grouped by batch, then by cell type within each
batch, the way a raw atlas is concatenated (not preshuffled). Every cell type has
its own gene program: log-normal gene weights shared by all types, a boosted
marker subset per type, and a few very highly expressed genes (mitochondrial /
ribosomal style) so that most counts are 1-3 and a few reach the hundreds. Counts
are drawn as a multinomial over each cell's library size: every UMI picks a gene
from the type's distribution (alias method), then ``np.unique`` over
``row * n_vars + gene`` keys yields the CSR rows and counts directly.

Generation and writing go block by block, so memory stays bounded (a few hundred
MB) whatever ``--n-obs`` is.

Example
-------
    python benchmarks/make_atlas.py --out /tmp/atlas.zarr --h5ad
"""

from __future__ import annotations

import argparse
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from scipy.special import ndtri
from zarr.codecs import BloscCodec, ZstdCodec

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Cells whose UMIs are drawn in one vectorized pass; bounds the generator's temporaries.
GEN_CELLS = 1024
#: Highly expressed genes (mitochondrial / ribosomal style) and the share of UMIs each takes.
N_HOUSEKEEPING = 8
HOUSEKEEPING_SHARE = 0.025
#: Marker genes boosted in each cell type's program.
N_MARKERS = 400
#: Spread (sigma of the log) of per-cell library sizes.
LIBSIZE_SIGMA = 0.5
#: Compressors of X/data and X/indices by ``--codec`` name.
CODECS = {
    "zstd": (ZstdCodec(level=0),),
    "lz4": (BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"),),
    "none": (),
}


@dataclass(frozen=True, slots=True)
class AtlasSpec:
    """Shape of the atlas to generate.

    Attributes
    ----------
    n_obs
        Cells (rows).
    n_vars
        Genes (columns).
    nnz_per_cell
        Target mean of non-zeros (detected genes) per cell.
    n_batches
        Batches (donors / runs); cells of a batch are contiguous.
    n_types
        Cell types; within a batch, cells of a type are contiguous.
    seed
        Seed of every random draw.
    """

    n_obs: int
    n_vars: int
    nnz_per_cell: int
    n_batches: int
    n_types: int
    seed: int


@dataclass(frozen=True, slots=True)
class AliasTable:
    """Walker/Vose alias table: O(1) draws from a discrete distribution over genes.

    Attributes
    ----------
    prob
        Acceptance threshold of each slot, shape ``(n_vars,)``, float64 in ``[0, 1]``.
    alias
        Gene taken when a slot's draw is rejected, shape ``(n_vars,)``, int32.
    """

    prob: np.ndarray
    alias: np.ndarray

    @classmethod
    def build(cls, p: np.ndarray) -> AliasTable:
        """Build the table of probabilities ``p`` (shape ``(n,)``, summing to 1)."""
        n = len(p)
        scaled = p * n
        alias = np.arange(n, dtype=np.int32)
        small = np.flatnonzero(scaled < 1).tolist()
        large = np.flatnonzero(scaled >= 1).tolist()
        while small and large:
            s, big = small.pop(), large.pop()
            alias[s] = big
            scaled[big] -= 1.0 - scaled[s]
            (small if scaled[big] < 1 else large).append(big)
        for i in small + large:  # numerical leftovers are certain slots
            scaled[i] = 1.0
        return cls(np.minimum(scaled, 1.0), alias)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` gene ids, shape ``(n,)``, int32."""
        u = rng.random(n) * len(self.prob)
        slot = u.astype(np.int32)
        return np.where(u - slot < self.prob[slot], slot, self.alias[slot])


def gene_programs(spec: AtlasSpec, rng: np.random.Generator) -> np.ndarray:
    """Return each cell type's expression distribution over genes.

    Returns
    -------
    Shape ``(n_types, n_vars)``, float64, each row summing to 1.
    """
    base = rng.lognormal(0.0, 1.8, spec.n_vars)
    programs = np.empty((spec.n_types, spec.n_vars))
    for t in range(spec.n_types):
        w = base * rng.lognormal(0.0, 0.3, spec.n_vars)
        markers = rng.choice(spec.n_vars, min(N_MARKERS, spec.n_vars), replace=False)
        w[markers] *= rng.lognormal(np.log(12.0), 0.5, len(markers))
        w /= w.sum()
        n_hk = min(N_HOUSEKEEPING, spec.n_vars // 4)
        w *= 1.0 - n_hk * HOUSEKEEPING_SHARE
        w[:n_hk] += HOUSEKEEPING_SHARE * rng.uniform(0.5, 1.5, n_hk)
        programs[t] = w / w.sum()
    return programs


def calibrate_libsize(p: np.ndarray, target_nnz: float) -> float:
    """Median library size (UMIs) at which cells of program ``p`` detect ``target_nnz`` genes.

    Uses ``E[detected | L] = sum_g 1 - exp(-L p_g)``, tabulated on a log grid of
    ``L``, averaged over the log-normal spread of library sizes, and bisects on
    the median's log.
    """
    log_grid = np.linspace(np.log(target_nnz) - 3, np.log(target_nnz * 1000) + 3, 256)
    detected = np.array([(1.0 - np.exp(-np.exp(x) * p)).sum() for x in log_grid])
    spread = LIBSIZE_SIGMA * ndtri((np.arange(64) + 0.5) / 64)

    def mean_detected(log_median: float) -> float:
        return float(np.interp(log_median + spread, log_grid, detected).mean())

    lo, hi = np.log(target_nnz), np.log(target_nnz * 1000)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_detected(mid) < target_nnz else (lo, mid)
    return float(np.exp(0.5 * (lo + hi)))


def cell_layout(spec: AtlasSpec, rng: np.random.Generator) -> pd.DataFrame:
    """Assign cells to (batch, cell type) blocks, batch-major and contiguous.

    Returns
    -------
    obs with categorical ``batch`` and ``cell_type``, indexed by cell names.
    """
    batch_share = rng.dirichlet(np.full(spec.n_batches, 5.0))
    type_share = rng.dirichlet(np.full(spec.n_types, 1.0), size=spec.n_batches)
    group_share = (batch_share[:, None] * type_share).ravel()
    counts = rng.multinomial(spec.n_obs, group_share)
    group = np.repeat(np.arange(len(counts)), counts)
    batches = [f"batch_{b}" for b in range(spec.n_batches)]
    types = [f"type_{t:02d}" for t in range(spec.n_types)]
    width = len(str(spec.n_obs - 1))
    return pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(group // spec.n_types, batches),
            "cell_type": pd.Categorical.from_codes(group % spec.n_types, types),
        },
        index=pd.Index([f"cell_{i:0{width}d}" for i in range(spec.n_obs)]),
    )


def draw_counts(
    tables: list[AliasTable],
    types: np.ndarray,
    libsize: np.ndarray,
    n_vars: int,
    rng: np.random.Generator,
) -> sp.csr_matrix:
    """Draw the UMI counts of consecutive cells.

    Parameters
    ----------
    tables
        Alias table of each cell type's program.
    types
        Cell type code of each cell, shape ``(n,)``.
    libsize
        UMIs of each cell, shape ``(n,)``, int64.
    n_vars
        Genes.
    rng
        Generator to draw from.

    Returns
    -------
    Counts, shape ``(n, n_vars)``, float32 values, int32 indices, sorted columns.
    """
    genes = np.empty(int(libsize.sum()), dtype=np.int64)
    offsets = np.r_[0, np.cumsum(libsize)]
    for t in np.unique(types):
        for a, b in _runs(types == t):
            genes[offsets[a] : offsets[b]] = tables[t].draw(rng, int(offsets[b] - offsets[a]))
    rows = np.repeat(np.arange(len(libsize), dtype=np.int64), libsize)
    keys, counts = np.unique(rows * n_vars + genes, return_counts=True)
    indptr = np.searchsorted(keys, np.arange(len(libsize) + 1, dtype=np.int64) * n_vars)
    return sp.csr_matrix(
        (counts.astype(np.float32), (keys % n_vars).astype(np.int32), indptr),
        shape=(len(libsize), n_vars),
    )


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` runs of True in a boolean mask."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def generate(
    spec: AtlasSpec, obs: pd.DataFrame, block_cells: int, rng: np.random.Generator
) -> Iterator[sp.csr_matrix]:
    """Yield X in consecutive row blocks of at most ``block_cells`` cells."""
    programs = gene_programs(spec, rng)
    tables = [AliasTable.build(p.copy()) for p in programs]
    medians = np.array([calibrate_libsize(p, spec.nnz_per_cell) for p in programs])
    depth = rng.lognormal(0.0, 0.15, spec.n_batches)
    types = obs["cell_type"].cat.codes.to_numpy()
    batches = obs["batch"].cat.codes.to_numpy()
    for start in range(0, spec.n_obs, block_cells):
        stop = min(start + block_cells, spec.n_obs)
        parts = []
        for a in range(start, stop, GEN_CELLS):
            b = min(a + GEN_CELLS, stop)
            t = types[a:b]
            lib = medians[t] * depth[batches[a:b]] * rng.lognormal(0.0, LIBSIZE_SIGMA, b - a)
            lib = np.maximum(lib, 50).astype(np.int64)
            parts.append(draw_counts(tables, t, lib, spec.n_vars, rng))
        yield sp.vstack(parts, format="csr")


def _open_h5ad(path: Path, obs: pd.DataFrame, var: pd.DataFrame) -> h5py.File:
    f = h5py.File(path, "w")
    ad.io.write_elem(f, "/", ad.AnnData(obs=obs, var=var))
    return f


def write_atlas(
    spec: AtlasSpec,
    out: Path,
    *,
    h5ad: Path | None,
    block_cells: int,
    chunk_cells: int,
    shard_chunks: int,
    codec: str,
) -> dict[str, float]:
    """Generate the atlas and write it as a zarr v3 store (and optionally an .h5ad copy).

    Parameters
    ----------
    spec
        What to generate.
    out
        zarr store to (over)write.
    h5ad
        Also write this .h5ad file; None to skip.
    block_cells
        Cells generated and appended per write, rows.
    chunk_cells
        Cells' worth of non-zeros per zarr chunk of ``X/data`` and ``X/indices``.
    shard_chunks
        Chunks per shard.
    codec
        Compressor of ``X/data`` and ``X/indices``, a key of :data:`CODECS`.

    Returns
    -------
    Statistics: seconds spent, non-zeros, count distribution.
    """
    rng = np.random.default_rng(spec.seed)
    obs = cell_layout(spec, rng)
    width = len(str(spec.n_vars - 1))
    var = pd.DataFrame(index=pd.Index([f"GENE{i:0{width}d}" for i in range(spec.n_vars)]))
    chunk = chunk_cells * spec.nnz_per_cell
    kwargs = {"chunks": (chunk,), "shards": (chunk * shard_chunks,), "compressors": CODECS[codec]}
    root = zarr.open_group(out, mode="w", zarr_format=3)
    with ad.settings.override(auto_shard_zarr_v3=False):  # obs/var: small, unsharded
        ad.io.write_elem(root, "/", ad.AnnData(obs=obs, var=var))
    h5 = _open_h5ad(h5ad, obs, var) if h5ad is not None else None
    stats = {"nnz": 0, "sum": 0.0, "ones": 0, "le3": 0, "ge100": 0, "max": 0.0}
    t0 = time.perf_counter()
    try:
        for i, block in enumerate(generate(spec, obs, block_cells, rng)):
            _tally(stats, block)
            _write_block(root, block, first=i == 0, dataset_kwargs=kwargs)
            if h5 is not None:
                _write_block(h5, block, first=i == 0, dataset_kwargs={})
            _progress(stats, t0, min((i + 1) * block_cells, spec.n_obs), spec.n_obs)
    finally:
        if h5 is not None:
            h5.close()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        zarr.consolidate_metadata(out)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _write_block(
    group: zarr.Group | h5py.File,
    block: sp.csr_matrix,
    *,
    first: bool,
    dataset_kwargs: dict[str, object],
) -> None:
    """Write the first block with ``write_elem``, append the others to ``X``."""
    if not first:
        ad.io.sparse_dataset(group["X"]).append(block)
        return
    ad.io.write_elem(group, "X", block, dataset_kwargs=dataset_kwargs)
    _widen_indptr(group["X"])


def _widen_indptr(x: zarr.Group | h5py.Group) -> None:
    """Store ``indptr`` as int64 so appends can pass 2**31 non-zeros.

    scipy gives int32 ``indptr`` and ``indices`` together when a block is small;
    the on-disk layout of large atlases keeps int32 indices and int64 row offsets.
    """
    indptr = x["indptr"][...]
    if indptr.dtype == np.int64:
        return
    if isinstance(x, h5py.Group):
        del x["indptr"]
        x.create_dataset("indptr", data=indptr.astype(np.int64), maxshape=(None,))
    else:
        old = x["indptr"]
        x.create_array(
            "indptr",
            shape=old.shape,
            dtype=np.int64,
            chunks=old.chunks,
            shards=old.shards,
            overwrite=True,
        )[...] = indptr.astype(np.int64)


def _tally(stats: dict[str, float], block: sp.csr_matrix) -> None:
    d = block.data
    stats["nnz"] += block.nnz
    stats["sum"] += float(d.sum(dtype=np.float64))
    stats["ones"] += int((d == 1).sum())
    stats["le3"] += int((d <= 3).sum())
    stats["ge100"] += int((d >= 100).sum())
    stats["max"] = max(stats["max"], float(d.max(initial=0)))


def _progress(stats: dict[str, float], t0: float, done: int, total: int) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    print(
        f"\r  {done:>10,} / {total:,} cells  {rate:,.0f} cells/s  "
        f"{stats['nnz'] / done:,.0f} nnz/cell",
        end="",
        flush=True,
    )


def disk_bytes(path: Path) -> int:
    """Bytes a file, or all files under a directory, take."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="zarr store to write (overwritten)")
    p.add_argument("--n-obs", type=int, default=100_000, help="cells (default %(default)s)")
    p.add_argument("--n-vars", type=int, default=20_000, help="genes (default %(default)s)")
    p.add_argument(
        "--nnz-per-cell",
        type=int,
        default=1_500,
        help="target mean detected genes per cell (default %(default)s)",
    )
    p.add_argument("--n-batches", type=int, default=8, help="batches (default %(default)s)")
    p.add_argument("--n-types", type=int, default=12, help="cell types (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument(
        "--h5ad",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="also write an .h5ad copy (default path: OUT with suffix .h5ad)",
    )
    p.add_argument(
        "--block-cells",
        type=int,
        default=8192,
        help="cells generated per write (default %(default)s)",
    )
    p.add_argument(
        "--chunk-cells",
        type=int,
        default=64,
        help="cells' worth of non-zeros per zarr chunk (default %(default)s)",
    )
    p.add_argument(
        "--shard-chunks", type=int, default=64, help="zarr chunks per shard (default %(default)s)"
    )
    p.add_argument(
        "--codec",
        choices=sorted(CODECS),
        default="zstd",
        help="compressor of X/data and X/indices: zstd (zarr's default), lz4 "
        "(blosc, as annbatch writes its collections) or none "
        "(default %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Generate the atlas described on the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    spec = AtlasSpec(
        args.n_obs, args.n_vars, args.nnz_per_cell, args.n_batches, args.n_types, args.seed
    )
    h5ad = (
        None
        if args.h5ad is None
        else (args.out.with_suffix(".h5ad") if args.h5ad is True else Path(args.h5ad))
    )
    print(
        f"generating {spec.n_obs:,} cells x {spec.n_vars:,} genes, ~{spec.nnz_per_cell:,} "
        f"nnz/cell, {spec.n_batches} batches x {spec.n_types} types -> {args.out}"
    )
    stats = write_atlas(
        spec,
        args.out,
        h5ad=h5ad,
        block_cells=args.block_cells,
        chunk_cells=args.chunk_cells,
        shard_chunks=args.shard_chunks,
        codec=args.codec,
    )
    nnz = stats["nnz"]
    print(
        f"\ndone in {stats['seconds']:.1f} s: {nnz:,} non-zeros ({nnz / spec.n_obs:,.0f} per "
        f"cell), {stats['sum'] / spec.n_obs:,.0f} UMIs per cell"
    )
    print(
        f"counts: {stats['ones'] / nnz:.1%} are 1, {stats['le3'] / nnz:.1%} are <= 3, "
        f"{stats['ge100']:,} are >= 100, max {stats['max']:,.0f}"
    )
    print(f"X payload (float32 data + int32 indices): {nnz * 8 / 2**20:,.0f} MiB")
    print(f"zarr on disk: {disk_bytes(args.out) / 2**20:,.0f} MiB  {args.out}")
    if h5ad is not None:
        print(f"h5ad on disk: {disk_bytes(h5ad) / 2**20:,.0f} MiB  {h5ad}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
