"""Elastic resume: a job restarted with another world size mid-epoch sees every row once."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from annserve.client import Output, RemoteLoader, Sharding
from annserve.errors import InvalidRequestError, OutOfRangeError
from conftest import real_path

N_OBS = 700  # pbmc68k_reduced
BASE = {
    "batch_size": 16,
    "chunk_size": 8,
    "preload_nchunks": 4,
    "seed": 3,
    "return_index": True,
    "output": Output(to_torch=False),
}


def world(address: str, size: int, **args) -> list[RemoteLoader]:
    """One loader per rank of a world of ``size`` ranks."""
    even = args.pop("even_batches", True)
    return [
        RemoteLoader(address, sharding=Sharding(rank, size, even_batches=even), **BASE, **args)
        for rank in range(size)
    ]


def consume(loaders: list[RemoteLoader], n_batches: int | None) -> list[int]:
    """Rows of the next ``n_batches`` batches of every rank (lockstep); None: to the end."""
    rows = []
    for loader in loaders:
        iterator = iter(loader)
        for batch in islice(iterator, n_batches):
            rows.extend(batch["index"].tolist())
        iterator.close()
    return rows


def restart(loaders: list[RemoteLoader], address: str, size: int, **args) -> list[RemoteLoader]:
    """The ranks of a new world of ``size``, each resumed from rank 0's checkpoint."""
    state = loaders[0].state_dict()
    resumed = world(address, size, **args)
    for loader in resumed:
        loader.load_state_dict(state)
    return resumed


@pytest.mark.parametrize(
    ("sizes", "steps"),
    [((2, 3), (5,)), ((3, 2), (4,)), ((2, 3, 2), (3, 2)), ((4, 1), (0,))],
    ids=["2-3", "3-2", "2-3-2", "4-1-none-consumed"],
)
def test_every_row_once_across_worlds(serve, sizes, steps):
    address = serve(real_path("pbmc68k"))
    loaders = world(address, sizes[0], even_batches=False)
    seen = []
    for size, n_batches in zip(sizes[1:], steps, strict=True):
        seen += consume(loaders, n_batches)
        loaders = restart(loaders, address, size, even_batches=False)
    seen += consume(loaders, None)
    counts = Counter(seen)
    assert set(counts) == set(range(N_OBS))
    assert set(counts.values()) == {1}
    assert all(loader.epoch == 1 for loader in loaders)


def test_even_shards_pad_only_the_new_worlds_remainder(serve):
    address = serve(real_path("pbmc68k"))
    old = world(address, 2)  # 350 rows each: no padding
    consumed = consume(old, 5)
    new = restart(old, address, 3)
    rest = consume(new, None)
    left = N_OBS - len(consumed)  # 540: 180 per rank, no padding
    assert len(rest) == left + (-left % 3)
    assert Counter(consumed + rest).keys() == set(range(N_OBS))
    assert len(set(consumed) & set(rest)) == 0


def test_drop_last_sees_each_row_at_most_once(serve):
    address = serve(real_path("pbmc68k"))
    old = world(address, 3, drop_last=True)
    consumed = consume(old, 4)
    new = restart(old, address, 2, drop_last=True)
    rest = consume(new, None)
    counts = Counter(consumed + rest)
    assert set(counts.values()) == {1}
    # only the new world's remainder is dropped: less than a batch per rank and a row per rank
    assert N_OBS - len(counts) < 2 * (BASE["batch_size"] + 1)


def test_the_same_world_resumes_where_it_stopped(serve):
    address = serve(real_path("pbmc68k"))
    uninterrupted = consume(world(address, 2), None)
    old = world(address, 2)
    first = consume(old, 3)
    state = old[1].state_dict()  # any rank's checkpoint says how far all got
    assert state["shards"] == 2
    assert state["earlier_worlds"] == []
    new = restart(old, address, 2)
    assert Counter(first + consume(new, None)) == Counter(uninterrupted)


def test_a_chained_state_records_each_world(serve):
    address = serve(real_path("pbmc68k"))
    old = world(address, 2)
    consume(old, 2)
    middle = restart(old, address, 3)
    consume(middle, 1)
    state = middle[0].state_dict()
    assert state["earlier_worlds"] == [[2, 2]]
    assert (state["shards"], state["batch"]) == (3, 1)
    last = restart(middle, address, 1)
    assert last[0].state_dict()["earlier_worlds"] == [[2, 2], [3, 1]]


def test_a_state_from_another_configuration_is_refused(serve):
    address = serve(real_path("pbmc68k"))
    (loader,) = world(address, 1)
    state = loader.state_dict()
    (other,) = world(address, 1, shuffle=False)
    with pytest.raises(InvalidRequestError, match="state_dict was saved with"):
        other.load_state_dict(state)
    with pytest.raises(InvalidRequestError, match="not a RemoteLoader state"):
        other.load_state_dict({"seed": 1})


def test_a_checkpoint_past_the_old_worlds_batches_is_out_of_range(serve):
    address = serve(real_path("pbmc68k"))
    (loader,) = world(address, 1)
    state = {**loader.state_dict(), "shards": 2, "batch": 10_000}
    (resumed,) = world(address, 1)
    resumed.load_state_dict(state)
    with pytest.raises(OutOfRangeError, match=r"earlier_worlds\[0\]\.batches must be in 0\.\.22"):
        len(resumed)


def test_a_world_restarted_after_the_last_batch_streams_nothing(serve):
    address = serve(real_path("pbmc68k"))
    old = world(address, 2)
    consume(old, None)  # the iterators end: the loaders move to epoch 1
    state = {**old[0].state_dict(), "epoch": 0, "batch": len(old[0])}  # saved just before
    new = world(address, 3)
    for loader in new:
        loader.load_state_dict(state)
    assert consume(new, None) == []
    assert all(loader.epoch == 1 for loader in new)
