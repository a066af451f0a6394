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


# --- alignment of preload buffers with batches, as in annbatch -------------------------
BATCH, CHUNK, PRELOAD = 256, 32, 16  # one full preload buffer = two batches


def annbatch_batch_chunks(n_obs: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Chunk of every row of every batch of one epoch under annbatch's rule.

    A transcription of annbatch's ``_ChunkSampler`` without replacement, shuffled
    (``_compute_slices_without_replacement``, ``_iter_from_slices_base``): slices over
    the whole collection, the short one last in iteration order; each preload buffer's
    rows permuted and split into batches, never mixing two buffers.
    """
    order = np.arange(-(-n_obs // CHUNK))
    rng.shuffle(order)
    lengths = np.full(len(order), CHUNK)
    lengths[order[-1]] = n_obs % CHUNK or CHUNK  # the slot iterated last is the short one
    batches = []
    for first in range(0, len(order), PRELOAD):
        ids = np.arange(first, min(first + PRELOAD, len(order)))
        chunk_of_row = np.repeat(ids, lengths[order[ids]])[
            rng.permutation(lengths[order[ids]].sum())
        ]
        batches += [chunk_of_row[i : i + BATCH] for i in range(0, len(chunk_of_row), BATCH)]
    return batches


def annserve_batch_chunks(offsets: list[int], seed: int) -> list[np.ndarray]:
    """Chunk of every row of every batch of one epoch of :class:`ChunkSampler`.

    Batches cut the epoch's row sequence as the stream does (a buffer's leftover
    rows open the next batch).
    """
    sampler = ChunkSampler(ChunkLayout(offsets, CHUNK), PRELOAD, shuffle=True, seed=seed)
    starts, _ = sampler.layout.bounds(np.arange(sampler.layout.n_chunks))
    chunk_of_row = np.searchsorted(starts, epoch_rows(sampler, 0), side="right") - 1
    return [chunk_of_row[i : i + BATCH] for i in range(0, len(chunk_of_row), BATCH)]


def distinct_chunks(batches: list[np.ndarray]) -> tuple[float, float]:
    """Mean and standard deviation over an epoch of the distinct chunks per batch."""
    counts = np.array([len(np.unique(b)) for b in batches])
    return float(counts.mean()), float(counts.std())


@pytest.mark.parametrize(
    "offsets",
    [[0, 10_000], [0, 3001, 6502, 10_000]],  # every group ends in a short chunk
    ids=["one-group", "three-groups"],
)
def test_batches_mix_as_many_chunks_as_annbatch(offsets):
    seeds = range(8)
    ours = np.mean([distinct_chunks(annserve_batch_chunks(offsets, s)) for s in seeds], axis=0)
    reference = np.mean(
        [
            distinct_chunks(annbatch_batch_chunks(offsets[-1], np.random.default_rng(s)))
            for s in seeds
        ],
        axis=0,
    )
    # a batch spanning two buffers mixes ~PRELOAD more chunks: misalignment moves the mean by >2
    assert abs(ours[0] - reference[0]) < 0.3, (ours, reference)
    assert abs(ours[1] - reference[1]) < 0.5, (ours, reference)


@pytest.mark.parametrize("offsets", [[0, 1003], [0, 10, 11, 450, 1000]])
def test_short_chunks_close_the_epoch_and_full_buffers_stay_full(offsets):
    layout = ChunkLayout(offsets, 8)
    sampler = ChunkSampler(layout, 4, shuffle=True, seed=2)
    _, lengths = layout.bounds(np.arange(layout.n_chunks))
    n_full_buffers = int(np.count_nonzero(lengths == 8)) // 4
    for epoch in range(3):
        sizes = [len(rows) for rows in sampler.preloads(epoch)]
        assert sizes[:n_full_buffers] == [4 * 8] * n_full_buffers
        assert sum(sizes) == offsets[-1]
