"""Shared reads: identical streams read each preload buffer once and still get their own batches.

Streams run in-process through :func:`epoch_frames` with a :class:`SharedReads` of the
test's own (consumed round-robin from one thread, so their pace is the test's), and
through a real daemon on 127.0.0.1. Store reads are counted by wrapping the store's
``read_rows``; every stream's frames are compared byte for byte with a lone stream's.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest

from annserve.buffers import BufferPool
from annserve.server.io.store import open_store
from annserve.server.plan.epoch import pieces_in_spans
from annserve.server.plan.request import plan_stream
from annserve.server.plan.selection import make_sampler
from annserve.server.rpc.app import build_server
from annserve.server.stream import shared as shared_module
from annserve.server.stream.frames import epoch_frames, epoch_span
from annserve.server.stream.shared import SharedReads, Subscription, read_key, sweep_key
from annserve.v1 import annserve_pb2 as pb
from conftest import real_path
from ops_support import stream_call

# mouse10x: 10,000 cells; 256-row buffers of 32-row chunks, one 256-row batch per frame
REQUEST = {
    "batch_size": 256,
    "chunk_size": 32,
    "preload_nchunks": 8,
    "shuffle": True,
    "seed": 7,
    "epoch": 2,
    "return_index": True,
}
JOIN_S = 60.0  # seconds a stream thread may take, at most


@pytest.fixture(scope="module")
def store():
    """mouse10x opened once; ``store.reads`` counts X reads by rows (wrapping read_rows)."""
    opened = open_store(real_path("mouse10x"))
    read_rows = opened.read_rows
    opened.reads = Counter()
    lock = threading.Lock()

    def counting(rows, key="X", pool=None, **options):
        if key == "X":
            with lock:
                opened.reads[rows.tobytes()] += 1
        return read_rows(rows, key, pool, **options)

    opened.read_rows = counting
    return opened


def _plan(store, **fields):
    plan = plan_stream(pb.StreamBatchesRequest(**{**REQUEST, **fields}), store)
    return plan, make_sampler(store, plan)


def _pieces(sampler, plan):
    left, span = epoch_span(sampler, plan)
    return pieces_in_spans(sampler, plan.epoch, left.positions(span))


def _n_pieces(store, **fields) -> int:
    plan, sampler = _plan(store, **fields)
    return sum(1 for _ in _pieces(sampler, plan))


class _Stream:
    """One stream's frames generator, its subscription and its cancelled event."""

    def __init__(self, store, registry: SharedReads | None, **fields) -> None:
        plan, sampler = _plan(store, **fields)
        self.cancelled = threading.Event()
        self._sub = None if registry is None else registry.subscribe(store, plan, self.cancelled)
        self.frames = epoch_frames(store, sampler, plan, cancelled=self.cancelled, shared=self._sub)
        self.got: list[bytes] = []
        self.done = False

    def step(self) -> bool:
        """Take one frame; return False once the stream has ended."""
        if not self.done:
            frame = next(self.frames, None)
            if frame is None:
                self.end()
            else:
                self.got.append(frame.data)
        return not self.done

    @property
    def sub(self) -> Subscription:
        assert self._sub is not None
        return self._sub

    def end(self) -> None:
        self.done = True
        self.cancelled.set()
        self.frames.close()
        if self._sub is not None:
            self._sub.close()


def _alone(store, **fields) -> list[bytes]:
    stream = _Stream(store, None, **fields)
    while stream.step():
        pass
    return stream.got


def _round_robin(streams: list[_Stream], limit: int = 100_000) -> None:
    for _ in range(limit):
        if not any([s.step() for s in streams]):
            return
    msg = "streams did not end"
    raise AssertionError(msg)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_identical_streams_read_each_buffer_once(store, n):
    want = _alone(store)
    pieces = _n_pieces(store)
    assert pieces > 30  # many buffers: sharing is exercised along the whole epoch
    registry = SharedReads(buffers_per_stream=8)  # lock step: the bound is not what is tested
    streams = [_Stream(store, registry) for _ in range(n)]
    store.reads.clear()
    _round_robin(streams)
    for s in streams:
        assert s.got == want  # bit-exact, every frame, in order
    for frames in zip(*(s.got for s in streams), strict=True):
        assert all(f is frames[0] for f in frames)  # each frame encoded once for all
    assert len(store.reads) == pieces
    assert set(store.reads.values()) == {1}  # each buffer read once for all n streams
    assert sum(s.sub.reads for s in streams) == pieces
    assert sum(s.sub.shared for s in streams) == (n - 1) * pieces
    assert registry.groups() == 0
    assert registry.buffers() == 0


def _kept_frames(registry: SharedReads) -> int:
    """Frames the registry's groups keep with their pieces (encoded for sharing)."""
    groups = list(registry._groups.values())
    return sum(len(e.value[4]) for g in groups for e in g.entries.values() if e.done)


def test_only_streams_with_peers_keep_frames(store):
    registry = SharedReads(buffers_per_stream=8)
    lone = _Stream(store, registry)
    for _ in range(5):
        lone.step()
    assert _kept_frames(registry) == 0  # alone: frames are sent, not kept
    lone.end()
    pair = [_Stream(store, registry), _Stream(store, registry)]
    _round_robin(pair)
    assert all(a is b for a, b in zip(pair[0].got, pair[1].got, strict=True))  # shared


def test_streams_differing_only_in_framing_share(store):
    """batch_size, shards, start_batch, return_index, compression: same buffers, other frames."""
    variants: list[dict[str, int]] = [{}, {"return_index": False}, {"compression": 2}]
    framing: list[dict[str, int]] = [{"batch_size": 64}, {"shard_count": 2}, {"start_batch": 3}]
    keys = {read_key(store, _plan(store, **v)[0]) for v in variants + framing}
    assert len(keys) == 1
    wants = [_alone(store, **v) for v in variants]
    registry = SharedReads(buffers_per_stream=8)
    streams = [_Stream(store, registry, **v) for v in variants]
    store.reads.clear()
    _round_robin(streams)
    assert [s.got for s in streams] == wants
    assert set(store.reads.values()) == {1}
    assert len(store.reads) == _n_pieces(store)
    encoded = [{id(f) for f in s.got} for s in streams]  # s.got keeps each id unique
    assert not set.intersection(*encoded)  # other framing: each stream encodes its own


def test_a_sweeps_frames_have_one_key_in_every_epoch(store):
    """Frame pools are kept across epochs: the key of each epoch's group leaves it out."""
    key = sweep_key(store, _plan(store)[0])
    assert sweep_key(store, _plan(store, epoch=3)[0]) == key
    assert read_key(store, _plan(store, epoch=3)[0]) != read_key(store, _plan(store)[0])
    for other in ({"seed": 8}, {"shard_count": 2}, {"batch_size": 64}, {"chunk_size": 16}):
        assert sweep_key(store, _plan(store, **other)[0]) != key, other


@pytest.mark.parametrize(
    "other",
    [{"seed": 8}, {"epoch": 3}, {"chunk_size": 16}, {"shuffle": False}, {"split": "train"}],
)
def test_different_sampling_does_not_share(store, other):
    registry = SharedReads(buffers_per_stream=8)
    streams = [_Stream(store, registry), _Stream(store, registry, **other)]
    assert registry.groups() == 2
    store.reads.clear()
    _round_robin(streams)
    assert streams[0].got == _alone(store)
    assert streams[1].got == _alone(store, **other)
    assert [s.sub.shared for s in streams] == [0, 0]
    assert [s.sub.reads for s in streams] == [_n_pieces(store), _n_pieces(store, **other)]


def test_different_genes_do_not_share(store):
    genes = list(store.var_names[:50])
    key = read_key(store, _plan(store)[0])
    assert read_key(store, _plan(store, var_names=genes)[0]) != key
    assert read_key(store, _plan(store, encoding=pb.ENCODING_RAW)[0]) != key
    other = open_store(real_path("mouse10x"))  # another store object: never shared
    assert read_key(other, _plan(other)[0]) != key


def test_shards_get_exactly_their_rows(store):
    """DDP ranks share a group; the buffer at a shard boundary is cut differently by each."""
    shards = [{"shard_index": i, "shard_count": 3} for i in range(3)]
    wants = [_alone(store, **s) for s in shards]
    registry = SharedReads()
    streams = [_Stream(store, registry, **s) for s in shards]
    assert registry.groups() == 1
    _round_robin(streams)
    assert [s.got for s in streams] == wants


def test_cancelled_stream_does_not_stall_the_others(store):
    want = _alone(store)
    registry = SharedReads()
    streams = [_Stream(store, registry) for _ in range(3)]
    for _ in range(len(want) // 2):
        for s in streams:
            s.step()
    streams[0].end()  # the client left midway: cancelled, frames closed, unsubscribed
    store.reads.clear()
    _round_robin(streams[1:])
    assert [s.got for s in streams[1:]] == [want, want]
    assert len(streams[0].got) == len(want) // 2
    assert set(store.reads.values()) == {1}  # the two left still share
    assert registry.groups() == 0


def test_waiting_stream_leaves_when_cancelled(store):
    """A stream waiting for another's read returns at once when cancelled; the reader goes on."""
    plan, sampler = _plan(store)
    piece = next(_pieces(sampler, plan))
    registry = SharedReads()
    reader_cancel, waiter_cancel = threading.Event(), threading.Event()
    reader = registry.subscribe(store, plan, reader_cancel)
    waiter = registry.subscribe(store, plan, waiter_cancel)
    reading, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def slow_read(pool):
        reading.set()
        assert release.wait(JOIN_S)
        return ("piece",)

    def run(name, sub):
        results[name] = sub.get(piece, slow_read, BufferPool())

    threads = [threading.Thread(target=run, args=("reader", reader))]
    threads[0].start()
    assert reading.wait(JOIN_S)
    threads.append(threading.Thread(target=run, args=("waiter", waiter)))
    threads[1].start()
    waiter_cancel.set()
    threads[1].join(JOIN_S)
    assert not threads[1].is_alive()
    assert results == {"waiter": None}  # left while the read was still going
    release.set()
    threads[0].join(JOIN_S)
    assert results["reader"] == ("piece",)
    reader.close()
    waiter.close()
    assert registry.groups() == 0


def test_failed_read_is_each_streams_own(store):
    """A reader's error reaches its stream; a stream waiting for that read reads itself."""
    plan, sampler = _plan(store)
    piece = next(_pieces(sampler, plan))
    registry = SharedReads()
    a, b = registry.subscribe(store, plan), registry.subscribe(store, plan)
    reading, release = threading.Event(), threading.Event()
    errors = []

    def failing(pool):
        reading.set()
        assert release.wait(JOIN_S)
        msg = "disk gone"
        raise OSError(msg)

    def run():
        try:
            a.get(piece, failing, BufferPool())
        except OSError as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert reading.wait(JOIN_S)
    got = []
    waiter = threading.Thread(
        target=lambda: got.append(b.get(piece, lambda pool: ("b",), BufferPool()))
    )
    waiter.start()
    release.set()
    thread.join(JOIN_S)
    waiter.join(JOIN_S)
    assert [str(e) for e in errors] == ["disk gone"]
    assert got == [("b",)]
    assert (a.reads, b.reads, b.shared) == (0, 1, 0)
    a.close()
    b.close()


def test_slow_stream_does_not_pin_memory(store):
    """A stream far behind is detached (the group holds <= 2 buffers per stream): own reads."""
    want = _alone(store)
    registry = SharedReads(buffers_per_stream=2)
    fast, slow = _Stream(store, registry), _Stream(store, registry)
    slow.step()
    held = []
    while fast.step():
        held.append(registry.buffers())
    assert fast.got == want
    assert max(held) <= 2 * 2
    assert not slow.sub.attached  # detached while far behind
    while slow.step():
        pass
    assert slow.got == want  # its own reads, still bit-exact
    assert slow.sub.reads > _n_pieces(store) // 2
    assert registry.groups() == 0


def test_a_stream_briefly_behind_is_waited_for_not_detached(store):
    """A fast stream that needs room waits for one a buffer or two behind (lag_wait)."""
    want = _alone(store)
    pieces = _n_pieces(store)
    registry = SharedReads(buffers_per_stream=2, lag_wait=JOIN_S)
    fast, slow = _Stream(store, registry), _Stream(store, registry)
    store.reads.clear()
    attached = []

    def run(stream: _Stream, pause: float) -> None:
        while stream.step():
            attached.append(stream.sub.attached)
            time.sleep(pause)

    threads = [
        threading.Thread(target=run, args=(fast, 0.0)),
        threading.Thread(target=run, args=(slow, 0.01)),  # 10 ms per frame: always behind
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    assert not any(t.is_alive() for t in threads)
    assert fast.got == want
    assert slow.got == want
    assert all(attached)  # neither was ever detached
    assert len(store.reads) == pieces
    assert set(store.reads.values()) == {1}  # every buffer read once for both
    assert registry.groups() == 0


def test_a_new_epochs_group_keeps_buffers_for_the_previous_epochs_streams(store):
    """A trainer that starts the next epoch late takes even its first buffers from the group."""
    want = _alone(store, epoch=3)
    pieces = _n_pieces(store, epoch=3)
    registry = SharedReads(buffers_per_stream=2)
    first, second = _Stream(store, registry), _Stream(store, registry)  # epoch 2
    _round_robin([first])
    for _ in range(len(want) - 4):  # the second is 4 buffers (frames) from its epoch's end
        second.step()
    ahead = _Stream(store, registry, epoch=3)
    for _ in range(2):  # two buffers (a frame each) ahead, alone
        ahead.step()
    _round_robin([second])  # ends epoch 2
    late = _Stream(store, registry, epoch=3)
    _round_robin([ahead, late])
    assert ahead.got == want
    assert late.got == want
    assert (ahead.sub.reads, late.sub.reads, late.sub.shared) == (pieces, 0, pieces)
    assert registry.groups() == 0


def test_a_stream_past_its_last_piece_is_not_expected(store):
    """A lone trainer's previous stream, still ending, is not waited for in the next epoch."""
    registry = SharedReads(buffers_per_stream=2)
    before = _Stream(store, registry)
    frames = list(before.frames)  # every piece read and framed; the stream not closed yet
    assert frames
    assert not before.sub.closed
    after = _Stream(store, registry, epoch=3)
    assert after.sub._group.expected.total() == 0
    before.end()
    after.end()
    assert registry.groups() == 0


@pytest.mark.parametrize("ended", [False, True], ids=["frames-queued", "streams-ended"])
def test_a_sweeps_trainers_done_reading_are_expected_in_the_next_epoch(store, ended):
    """Two trainers read all of epoch 2; the later one's epoch 3 shares the first one's reads.

    Their epoch-2 streams are past their last piece (a read-ahead is, long before its
    trainer), or ended (trainers in lock step end an epoch together).
    """
    want = _alone(store, epoch=3)
    pieces = _n_pieces(store, epoch=3)
    registry = SharedReads(buffers_per_stream=2)
    before = [_Stream(store, registry), _Stream(store, registry)]
    for stream in before:
        assert list(stream.frames)
        if ended:
            stream.end()
    assert registry.groups() == (0 if ended else 1)
    ahead = _Stream(store, registry, epoch=3)
    assert ahead.sub._group.expected.total() == 1  # the other trainer; not its own
    for _ in range(2):
        ahead.step()
    late = _Stream(store, registry, epoch=3)
    _round_robin([ahead, late])
    assert ahead.got == late.got == want
    assert (late.sub.reads, late.sub.shared) == (0, pieces)
    for stream in before:
        stream.end()
    assert registry.groups() == 0


def test_a_trainer_an_epoch_start_behind_is_waited_for(store):
    """Epochs of 4 buffers, room for all: the next epoch's first stream waits for the other."""
    fields = {"preload_nchunks": 80}  # 2,560-row buffers: 4 per epoch
    pieces = _n_pieces(store, **fields, epoch=3)
    assert pieces == 4
    registry = SharedReads(buffers_per_stream=2, lag_wait=JOIN_S)
    for stream in [_Stream(store, registry, **fields), _Stream(store, registry, **fields)]:
        _round_robin([stream])  # epoch 2 ended; the group's count is remembered
    ahead = _Stream(store, registry, **fields, epoch=3)
    thread = threading.Thread(target=_round_robin, args=([ahead],))
    thread.start()
    time.sleep(0.3)  # without the wait, ahead's whole epoch is over meanwhile
    late = _Stream(store, registry, **fields, epoch=3)
    _round_robin([late])
    thread.join(timeout=JOIN_S)
    assert not thread.is_alive()
    assert ahead.got == late.got == _alone(store, **fields, epoch=3)
    # Each piece is read once; which of the two reads it is up to the threads' timing.
    assert ahead.sub.reads + late.sub.reads == pieces


def test_a_stream_that_never_comes_holds_no_more_than_its_share(store):
    """The expected stream never starts the new epoch: the group gives up its buffers."""
    want = _alone(store, epoch=3)
    registry = SharedReads(buffers_per_stream=2)
    stays = _Stream(store, registry)  # epoch 2, never ends
    stays.step()
    alone = _Stream(store, registry, epoch=3)
    held = []
    while alone.step():
        held.append(len(alone.sub._group.entries))
    assert alone.got == want
    assert max(held) <= 2 * 2  # two streams' worth: its own and the expected one's
    assert held[-1] <= 2 + 1  # then its own (and one it still frames)
    assert alone.sub.reads == _n_pieces(store, epoch=3)
    stays.end()
    assert registry.groups() == 0


def test_daemon_streams_share_reads(store, monkeypatch):
    """Three concurrent StreamBatches calls on a daemon: own frames, fewer store reads, metric."""
    # a 512-row buffer is 8 frames; the frame queue lets a stream run ~2 buffers ahead
    fields = {**REQUEST, "batch_size": 64, "preload_nchunks": 16}
    monkeypatch.setattr(shared_module.REGISTRY, "buffers_per_stream", 16)
    server = build_server({"mouse10x": store}, ["127.0.0.1:0"])
    try:
        address = f"127.0.0.1:{server.ports[0]}"
        with grpc.insecure_channel(address) as channel:
            want = list(stream_call(channel, **fields))
            registry = server.metrics.registry

            def metric(name: str, labels: dict[str, str]) -> float:
                return registry.get_sample_value(name, labels) or 0.0

            labels = {"store": "mouse10x"}
            lone_reads = metric("annserve_preload_buffers_total", {**labels, "source": "read"})
            first = threading.Barrier(3, timeout=JOIN_S)
            got: dict[int, list[bytes]] = {}

            def run(i: int) -> None:
                call = stream_call(channel, **fields)
                frames = [next(call)]
                first.wait()  # all three are open before any runs ahead
                frames += list(call)
                got[i] = frames

            threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(JOIN_S)
        reads = metric("annserve_preload_buffers_total", {**labels, "source": "read"})
        shared = metric("annserve_preload_buffers_total", {**labels, "source": "shared"})
    finally:
        server.shutdown(grace=1)
    pieces = _n_pieces(store, **fields)
    assert lone_reads == pieces
    assert [got.get(i) == want for i in range(3)] == [True, True, True]
    assert reads - lone_reads + shared == 3 * pieces
    assert reads - lone_reads < 2 * pieces  # one read served at least two streams mostly
    assert shared_module.REGISTRY.groups() == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"buffers_per_stream": 0}, "buffers_per_stream"), ({"lag_wait": -1}, "lag_wait")],
)
def test_bad_registry_settings_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SharedReads(**kwargs)
