"""The passes of ``annserve convert``: external shuffle, or input order.

Shuffle, in two passes with memory bounded by the bucket size:

1. every input is read in row blocks; each cell gets an iid uniform bucket in
   ``[0, n_buckets)`` (``numpy.random.default_rng([seed, 0, input_index]).random``, one
   draw per cell in input order, so blocking does not change the draws); a block's rows
   are grouped by bucket and appended to the buckets' spill files;
2. each bucket is read back whole, permuted in memory
   (``default_rng([seed, 1, bucket]).permutation``) and written as one group.

Uniform buckets plus a uniform permutation within each bucket, buckets concatenated,
give a uniformly random permutation of all cells. Without shuffle, blocks are
collected in input order into groups of about the same size.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from annserve.server.convert.remap import to_rows
from annserve.server.convert.rows import RowBlock
from annserve.server.convert.source import open_source
from annserve.server.convert.spill import SpillWriter, read_bucket
from annserve.server.convert.write import write_group

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import zarr

    from annserve.server.convert.carry import ObsmInfo
    from annserve.server.convert.manifest import GroupEntry
    from annserve.server.convert.obs import ColumnInfo
    from annserve.server.convert.plan import Plan

logger = logging.getLogger(__name__)

#: Largest block read from an input at once, bytes of X values.
MAX_BLOCK_BYTES = 64 << 20
#: Buckets are sized so that they hold on average this share of ``max_bucket_bytes``.
BUCKET_FILL = 0.8


def _column_bytes(column: ColumnInfo) -> int:
    """Estimated bytes of one value of an obs column in memory."""
    mask = int(column.nullable)  # bool
    if column.kind == "category":
        return 4 + mask  # int32 code
    if column.kind == "str" or column.dtype is None:
        return 8 + 24 + mask  # length + UTF-8 bytes
    return column.dtype.itemsize + mask


def _obsm_bytes(obsm: ObsmInfo) -> int:
    """Bytes of one row of an obsm element in memory (CSR ones counted as if dense)."""
    width = math.prod(obsm.tail)
    if obsm.sparse:
        return 8 + width * (4 + obsm.dtype.itemsize)  # length + int32 indices + values
    return width * obsm.dtype.itemsize


def row_bytes(plan: Plan) -> int:
    """Estimated bytes of a row in memory besides its matrix values (obs, obsm, lengths)."""
    names = 8 + 24  # length + UTF-8 bytes of an obs name
    columns = sum(_column_bytes(c) for c in plan.columns)
    obsm = sum(_obsm_bytes(o) for o in plan.obsm.values())
    return names + columns + obsm + 8 * len(plan.dtypes)


def value_bytes(plan: Plan) -> int:
    """Bytes of one stored X value in memory, with the matching values of every matrix.

    Layers and ``raw/X`` count as many values per X value as they hold at most in an
    input (raw often holds more genes than X).
    """
    total = 0.0
    for key, dtype in plan.dtypes.items():
        per_x = max(s.matrices[key].nnz / max(s.matrices["X"].nnz, 1) for s in plan.sources)
        total += max(per_x, 1.0) * (dtype.itemsize + plan.space(key)[1].itemsize)
    return math.ceil(total)


def estimate_bytes(plan: Plan) -> int:
    """Estimate of the collection's rows in memory (spill format), bytes.

    Dense inputs count every value (zeros are dropped later).
    """
    return sum(
        s.n_obs * row_bytes(plan)
        + sum(
            s.matrices[k].nnz * (d.itemsize + plan.space(k)[1].itemsize)
            for k, d in plan.dtypes.items()
        )
        for s in plan.sources
    )


def read_blocks(plan: Plan, i: int, block_bytes: int) -> Iterator[RowBlock]:
    """Rows of input ``i`` in collection layout, in blocks of about ``block_bytes`` bytes."""
    source = plan.sources[i]
    columns = {c.name for c in plan.columns}
    layers = [k.split("/", 1)[1] for k in plan.dtypes if k.startswith("layers/")]
    keys = {*plan.dtypes, *(f"obsm/{k}" for k in plan.obsm)}
    with open_source(source.path, source.label, layers) as reader:
        for start, stop in reader.blocks(value_bytes(plan), row_bytes(plan), block_bytes):
            yield to_rows(reader.read(start, stop, keys, columns), plan, i)


def _block_bytes(max_bucket_bytes: int) -> int:
    return max(1, min(MAX_BLOCK_BYTES, max_bucket_bytes // 8))


def shuffled(
    plan: Plan,
    root: zarr.Group,
    spill_dir: Path,
    *,
    seed: int,
    max_bucket_bytes: int,
    progress: bool,
) -> list[GroupEntry]:
    """Write the cells of all inputs in a seeded uniformly random order, one group per bucket.

    Parameters
    ----------
    plan
        The joined layout.
    root
        Group receiving the collection's groups.
    spill_dir
        Directory to create for the spill files (about the size of the uncompressed rows).
    seed
        Seed of the bucket draws and permutations, >= 0.
    max_bucket_bytes
        Bound on the rows held in memory at once (a bucket), bytes; buckets hold
        :data:`BUCKET_FILL` of it on average.
    progress
        Show tqdm progress bars.

    Returns
    -------
    The written groups, in order.
    """
    n_buckets = max(1, math.ceil(estimate_bytes(plan) / (BUCKET_FILL * max_bucket_bytes)))
    logger.info(
        "shuffling %d cells through %d buckets", sum(s.n_obs for s in plan.sources), n_buckets
    )
    template = plan.empty_block()
    writer = SpillWriter(spill_dir, n_buckets, template)
    t0 = time.perf_counter()
    try:
        _spill(plan, writer, seed, _block_bytes(max_bucket_bytes), progress)
    finally:
        writer.close()
    logger.info(
        "pass 1 (spill) took %.1f s; largest bucket %d cells, %.0f MB",
        time.perf_counter() - t0,
        writer.rows.max(),
        writer.bytes.max() / 1e6,
    )
    t0 = time.perf_counter()
    groups: list[GroupEntry] = []
    with tqdm(
        total=int(writer.rows.sum()), unit="cells", desc="convert: write", disable=not progress
    ) as bar:
        for b, path in enumerate(writer.paths):
            rows = read_bucket(path, template)
            path.unlink(missing_ok=True)
            if rows is None:
                continue
            rows = rows.take(np.random.default_rng([seed, 1, b]).permutation(rows.n_rows))
            groups.append(write_group(root, len(groups), rows, plan))
            bar.update(rows.n_rows)
    logger.info("pass 2 (permute and write) took %.1f s", time.perf_counter() - t0)
    return groups


def _spill(plan: Plan, writer: SpillWriter, seed: int, block_bytes: int, progress: bool) -> None:
    """Pass 1: give every cell a random bucket and append it to that bucket's file."""
    n_buckets = len(writer.paths)
    with tqdm(
        total=sum(s.n_obs for s in plan.sources),
        unit="cells",
        desc="convert: spill",
        disable=not progress,
    ) as bar:
        for i in range(len(plan.sources)):
            rng = np.random.default_rng([seed, 0, i])
            for block in read_blocks(plan, i, block_bytes):
                bucket = (rng.random(block.n_rows) * n_buckets).astype(np.int64)
                order = np.argsort(bucket, kind="stable")
                counts = np.bincount(bucket, minlength=n_buckets)
                grouped = block.take(order)
                ends = np.cumsum(counts)
                for b in np.flatnonzero(counts).tolist():
                    writer.append(b, grouped.slice(int(ends[b] - counts[b]), int(ends[b])))
                bar.update(block.n_rows)


def in_order(
    plan: Plan, root: zarr.Group, *, max_bucket_bytes: int, progress: bool
) -> list[GroupEntry]:
    """Write the cells of all inputs in input order, in groups of at most ``max_bucket_bytes``.

    Returns
    -------
    The written groups, in order.
    """
    target = BUCKET_FILL * max_bucket_bytes
    block_bytes = _block_bytes(max_bucket_bytes)
    groups: list[GroupEntry] = []
    pending: list[RowBlock] = []
    held = 0
    with tqdm(
        total=sum(s.n_obs for s in plan.sources),
        unit="cells",
        desc="convert: write",
        disable=not progress,
    ) as bar:
        for i in range(len(plan.sources)):
            for block in read_blocks(plan, i, block_bytes):
                pending.append(block)
                held += block.nbytes
                bar.update(block.n_rows)
                if held >= target:
                    groups.append(write_group(root, len(groups), RowBlock.concat(pending), plan))
                    pending, held = [], 0
        if pending:
            groups.append(write_group(root, len(groups), RowBlock.concat(pending), plan))
    return groups
