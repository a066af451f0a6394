from __future__ import annotations

import numpy as np
import pytest

from annserve.server.plan.sampler import ChunkLayout, ChunkSampler


def epoch_rows(sampler: ChunkSampler, epoch: int) -> np.ndarray:
    return np.concatenate(list(sampler.preloads(epoch)))


@pytest.mark.parametrize(
    ("n_obs", "chunk_size", "preload_nchunks"),
    [(1000, 32, 4), (1001, 7, 3), (5, 10, 2), (64, 1, 64), (1, 1, 1)],
)
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_exactly_once(n_obs, chunk_size, preload_nchunks, shuffle):
    sampler = ChunkSampler(
        ChunkLayout([0, n_obs], chunk_size), preload_nchunks, shuffle=shuffle, seed=3
    )
    rows = epoch_rows(sampler, 0)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(np.sort(rows), np.arange(n_obs))
    assert sampler.n_rows == n_obs


def test_same_seed_and_epoch_same_order_other_epoch_other_order():
    a = ChunkSampler(ChunkLayout([0, 1000], 16), 4, shuffle=True, seed=7)
    b = ChunkSampler(ChunkLayout([0, 1000], 16), 4, shuffle=True, seed=7)
    np.testing.assert_array_equal(epoch_rows(a, 2), epoch_rows(b, 2))
    assert not np.array_equal(epoch_rows(a, 2), epoch_rows(a, 3))
    other_seed = ChunkSampler(ChunkLayout([0, 1000], 16), 4, shuffle=True, seed=8)
    assert not np.array_equal(epoch_rows(a, 2), epoch_rows(other_seed, 2))


def test_no_shuffle_is_store_order():
    sampler = ChunkSampler(ChunkLayout([0, 1003], 10), 7, shuffle=False, seed=0)
    np.testing.assert_array_equal(epoch_rows(sampler, 5), np.arange(1003))


def test_preload_buffers_hold_whole_chunks():
    chunk_size, preload_nchunks = 8, 4
    sampler = ChunkSampler(ChunkLayout([0, 200], chunk_size), preload_nchunks, shuffle=True, seed=1)
    for rows in sampler.preloads(0):
        chunks = np.unique(rows // chunk_size)
        assert len(chunks) <= preload_nchunks
        # every chunk in the buffer is complete, so reads are contiguous runs of chunk_size rows
        assert len(rows) == sum(min(chunk_size, 200 - c * chunk_size) for c in chunks)


def test_shuffle_mixes_rows_within_buffer():
    sampler = ChunkSampler(ChunkLayout([0, 4096], 32), 16, shuffle=True, seed=0)
    first = next(sampler.preloads(0))
    assert not np.all(np.diff(first) > 0)


@pytest.mark.parametrize("shuffle", [True, False])
def test_chunks_never_span_two_groups(shuffle):
    offsets = np.array([0, 10, 11, 45, 100])
    sampler = ChunkSampler(ChunkLayout(offsets, 8), 3, shuffle=shuffle, seed=0)
    rows = epoch_rows(sampler, 1)
    np.testing.assert_array_equal(np.sort(rows), np.arange(100))
    chunk_starts = [0, 8, 10, 11, 19, 27, 35, 43, 45, 53, 61, 69, 77, 85, 93]
    chunks = [sampler.layout.rows(np.array([i])) for i in range(len(chunk_starts))]
    assert [c[0] for c in chunks] == chunk_starts
    for chunk in chunks:
        group = np.searchsorted(offsets, chunk[0], side="right") - 1
        assert chunk[-1] < offsets[group + 1]
        np.testing.assert_array_equal(chunk, np.arange(chunk[0], chunk[-1] + 1))
