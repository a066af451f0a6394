"""Range reads of on-disk arrays: the batched zarr indexer against zarr's own indexing."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr
from zarr.core.indexing import BasicIndexer

from annserve.server.io._zarr import ZARRS_PIPELINE
from annserve.server.io._zarr import RangesIndexer as _RangesIndexer
from annserve.server.io.ranges import range_reader, row_runs


@pytest.fixture(scope="module")
def values(real_adata):
    """Non-zero values of a real count matrix (pbmc3k), float32."""
    return real_adata("pbmc3k").X.data[:50_000].astype(np.float32)


def _ranges(rng, n, count):
    """Sorted, disjoint ``[a, b)`` ranges of ``0..n``, some empty-gapped, some at the ends."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=2 * count - 2, replace=False))
    bounds = np.r_[0, cuts, n].reshape(-1, 2)
    return [(int(a), int(b)) for a, b in bounds]


@pytest.mark.parametrize(("chunks", "shards"), [(64, None), (7, 21), (1000, 5000)])
def test_1d_projections_are_zarrs_own(tmp_path, values, chunks, shards):
    array = zarr.create_array(
        tmp_path / "a.zarr",
        shape=values.shape,
        dtype=values.dtype,
        chunks=(chunks,),
        shards=(shards,) if shards else None,
    )
    rng = np.random.default_rng(0)
    for _ in range(20):
        ranges = _ranges(rng, len(values), int(rng.integers(1, 40)))
        ranges.insert(1, (ranges[0][1], ranges[0][1]))  # an empty range (a row of zeros)
        got = list(_RangesIndexer.build(ranges, array.async_array))
        expected, offset = [], 0
        for a, b in ranges:
            for p in BasicIndexer(slice(a, b), array.shape, array.metadata.chunk_grid):
                rows = p.out_selection[0]
                expected.append(
                    (
                        p.chunk_coords,
                        p.chunk_selection,
                        (slice(rows.start + offset, rows.stop + offset),),
                        p.is_complete_chunk,
                    )
                )
            offset += b - a
        assert [tuple(p) for p in got] == expected


@pytest.mark.parametrize("pipeline", ["zarr-python", "zarrs"])
def test_zarr_and_hdf5_range_reads_match_numpy(tmp_path, values, pipeline):
    z = zarr.create_array(
        tmp_path / "a.zarr", shape=values.shape, dtype=values.dtype, chunks=(300,), shards=(1200,)
    )
    z[...] = values
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["a"] = values
    rng = np.random.default_rng(1)
    config = {"codec_pipeline.path": ZARRS_PIPELINE} if pipeline == "zarrs" else {}
    with zarr.config.set(config), h5py.File(tmp_path / "a.h5") as f:
        for reader in (range_reader(z), range_reader(f["a"])):
            for count in (1, 3, 57):
                ranges = _ranges(rng, len(values), count)
                ranges.insert(1, (ranges[0][1], ranges[0][1]))
                expected = np.concatenate([values[a:b] for a, b in ranges])
                np.testing.assert_array_equal(reader.read(ranges), expected)
                out = np.empty_like(expected)
                assert reader.read(ranges, out) is out
                np.testing.assert_array_equal(out, expected)


def test_row_runs_split_at_gaps():
    assert row_runs(np.array([0, 1, 2, 5, 6, 9], dtype=np.int64)) == [(0, 3), (5, 7), (9, 10)]
    assert row_runs(np.array([], dtype=np.int64)) == []
