"""Shared reads: streams that would read the same preload buffer read it once.

Several streams with the same store, matrix, genes, encoding, sampler and epoch (a
hyperparameter sweep, or DDP ranks whose shards meet in a buffer) visit the same
preload buffers. They join one *group* of a :class:`SharedReads` registry, keyed by
everything that decides what a buffer read holds (:func:`read_key`); the first stream
to need a piece of a buffer reads and prepares it, the others that need the same piece
wait for that read and get the very same arrays. Streams that also frame alike (equal
:func:`frame_key`: a sweep's identical trainers) share the serialized frames of a
piece too: the first to need a frame encodes it, the others send the same bytes. What
each stream sends is bit for bit what it would send alone.

Memory stays bounded: a group keeps a buffer while an attached stream may still ask for
it (its next piece is not past it) and at most :data:`BUFFERS_PER_STREAM` buffers per
attached stream, about what each would hold reading its own (``--stream-memory-mb``
budgets a stream at about two buffers). A new buffer that would exceed that first waits
up to :data:`LAG_WAIT_S` for the streams a few buffers behind to move on (identical
trainers drift apart by a buffer or two and back), then detaches those furthest
behind: they read their own buffers from then on (and rejoin if they catch up with a
buffer the group holds) instead of pinning memory without bound.
Shared buffers come from the group's own :class:`~annserve.buffers.BufferPool`, which
reuses a buffer only once no array of any stream views it.

A sweep's trainers end an epoch a moment apart, and the first to start the next one
would have read a buffer or two before the others join (the group keeps no buffer
behind its streams). So a new group *expects* the previous epoch's trainers: as many
streams of each framing as the previous epoch's group had at most, less the one that
came (a trainer's own previous stream may still be ending when it starts the next
epoch), and at least those still reading it (trainers in lock step may all have
ended that epoch's streams first: an ended group's count is kept :data:`REMEMBER_S`).
For each it keeps the buffers from where a stream framing alike began, within the
bound counted as if they were there, until they join or, once the group needs the
room, :data:`LAG_WAIT_S` has passed. A stream that leads the group's first buffer by
its share of buffers also waits up to :data:`LAG_WAIT_S` for them: a trainer that fell
an epoch behind would otherwise find every later epoch's group gone and read alone.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from annserve.buffers import BufferPool
from annserve.server.io.obs import ObsColumnData

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable

    from annserve.server.io.store import Store
    from annserve.server.plan.epoch import Piece
    from annserve.server.plan.request import StreamPlan

T = TypeVar("T")

#: Buffers a group keeps per attached stream (a stream holds about two of its own).
BUFFERS_PER_STREAM = 2
#: ``StreamPlan`` fields that only decide how buffers are cut into frames, never what
#: a buffer read holds; every other field (also ones added later) is part of the key.
FRAMING_FIELDS = frozenset(
    {
        "batch_size",
        "drop_last",
        "obs",
        "return_index",
        "compression",
        "compression_level",
        "shard",
        "start_batch",
        "earlier_worlds",
    }
)
#: Seconds a stream that needs room waits for the streams close behind it to move on.
LAG_WAIT_S = 0.5
#: Seconds the registry remembers how many streams an ended group had, for the next
#: epoch's group to expect them.
REMEMBER_S = 5.0
_POLL_S = 0.1  # seconds between checks of a waiting stream's cancelled event
_POOL_BUFFERS = 64  # a group pool keeps at most its peak of live buffers anyway
_PART_REFS = 3


def read_key(store: Store, plan: StreamPlan) -> Hashable:
    """Return what decides the preload buffers a stream reads, as a hashable key.

    Streams with equal keys read equal buffers: the same store object, the matrix,
    obsm arrays, gene columns and encoding (what ``prepare`` makes of a read), and the
    sampler's configuration and epoch (which rows each buffer holds). Fields that only
    frame the buffers (:data:`FRAMING_FIELDS`) are left out.

    Parameters
    ----------
    store
        The stream's store; compared by identity.
    plan
        The validated request.
    """
    names = [f.name for f in dataclasses.fields(plan) if f.name not in FRAMING_FIELDS]
    return (id(store), _fields(plan, names))


def frame_key(plan: StreamPlan) -> Hashable:
    """Return what, besides :func:`read_key`, decides the frames cut from a piece.

    The :data:`FRAMING_FIELDS` of ``plan``: streams of one group with equal keys cut
    equal frames from a piece whenever they reach it at the same position of their
    epochs (which the shard, ``start_batch`` and ``earlier_worlds`` fix).
    """
    return _fields(plan, sorted(FRAMING_FIELDS))


def sweep_key(store: Store, plan: StreamPlan) -> Hashable:
    """Return what identical streams of every epoch have in common: both keys, epoch left out.

    Equal for a sweep's trainers in any epoch: their frames hold the same rows of the
    same arrays, encoded alike, so memory written with one epoch's frames may carry
    the next epoch's (a frame pool's memfds, :meth:`~annserve.server.rpc.shm.
    SharedMemoryListener.frame_pool`).
    """
    return (read_key(store, dataclasses.replace(plan, epoch=0)), frame_key(plan))


def _fields(plan: StreamPlan, names: list[str]) -> tuple[tuple[str, Hashable], ...]:
    """Return the named fields of ``plan`` as ``(name, hashable value)`` pairs, in order."""
    return tuple((name, _hashable(getattr(plan, name))) for name in names)


def _hashable(value: object) -> Hashable:
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, ObsColumnData):  # the store's own column: its identity
        return ("column", value.name, id(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            type(value).__name__,
            *(_hashable(getattr(value, f.name)) for f in dataclasses.fields(value)),
        )
    if isinstance(value, Mapping):
        return ("mapping", *sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    hash(value)  # anything else must be hashable as it is
    return value


class _Entry(Generic[T]):
    """One piece of a preload buffer: being read by one stream, then ready for all."""

    __slots__ = ("done", "failed", "start", "stop", "value")

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.value: T | None = None
        self.done = False
        self.failed = False


class _Group:
    """The streams of one key, the buffers they share and the pool those come from."""

    def __init__(self, key: Hashable, store: Store, per_stream: int, lag_wait: float) -> None:
        self.key = key
        self.per_stream = per_stream
        self.lag_wait = lag_wait
        self.store = store  # keeps id(store) in the key unique while the group lives
        self.cond = threading.Condition()
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.positions: dict[Subscription, tuple[int, int]] = {}  # attached streams
        self.members: Counter[Hashable] = Counter()  # subscribed streams, by frame_key
        self.reading: Counter[Hashable] = Counter()  # members not past their last piece
        self.peak: Counter[Hashable] = Counter()  # most members at once, by frame_key
        self.expected: Counter[Hashable] = Counter()  # streams not yet here, by frame_key
        self.first: dict[Hashable, tuple[int, int]] = {}  # where each frame_key began
        self.pool = BufferPool(max_buffers=_POOL_BUFFERS)

    def bound(self) -> int:
        """Buffers the group may hold: per stream attached or expected (called locked)."""
        return self.per_stream * (len(self.positions) + self.expected.total())

    def prune(self, *, in_use: bool = True) -> None:
        """Drop the buffers no attached or expected stream will ask for (called locked).

        With ``in_use``, one a stream still frames is kept (its memory is held anyway),
        for a stream that joins a moment later.
        """
        held = [self.first[k] for k in +self.expected if k in self.first]
        if not self.positions and not held:
            self.entries.clear()
            return
        low = min([*self.positions.values(), *held])
        for buffer in [b for b in self.entries if b < low]:
            if not (in_use and _referenced(self.entries[buffer].value)):
                del self.entries[buffer]

    def make_room(self, sub: Subscription) -> bool:
        """Wait for, then detach, the streams furthest behind until a new buffer fits.

        Called locked. A group holds at most ``per_stream`` buffers per attached or
        expected stream; streams expected from the previous epoch get ``lag_wait``
        seconds to come (each that comes, another ``lag_wait``), then are no longer
        expected. Streams behind ``sub`` by at most as many buffers as the group holds (they
        share its buffers; DDP ranks' shards are far apart) get ``lag_wait`` seconds to
        move on; then those furthest behind are detached. Return False when ``sub``
        itself is furthest behind, or was detached meanwhile: it reads alone.
        """
        self.wait_for_expected(sub)
        deadline = time.monotonic() + self.lag_wait
        self.prune(in_use=False)
        while len(self.entries) >= (bound := self.bound()):
            if waiting := self.expected.total():  # for streams yet to come, then without them
                left = deadline - time.monotonic()
                if left > 0:
                    self.cond.wait(min(left, _POLL_S))
                    if self.expected.total() < waiting:  # one came: it may catch up
                        deadline = time.monotonic() + self.lag_wait
                else:
                    self.expected.clear()
                self.prune(in_use=False)
                continue
            if sub not in self.positions:  # detached while it waited
                return False
            mine = self.positions[sub]
            others = [p for s, p in self.positions.items() if s is not sub]
            if not others:  # what others left, bounded by their share; sub uses it up
                return True
            if min(others) >= mine:
                sub.detach()
                return False
            low = min(others)
            close = low[0] == mine[0] and mine[1] - low[1] <= bound  # near: shares buffers
            left = deadline - time.monotonic()
            if close and left > 0:
                self.cond.wait(min(left, _POLL_S))
                self.prune(in_use=False)
                continue
            for s in [s for s, p in self.positions.items() if p == low and s is not sub]:
                s.detach()
            self.prune(in_use=False)
        return True

    def wait_for_expected(self, sub: Subscription) -> None:
        """Wait for the expected streams while ``sub`` leads the group's start by its share.

        Called locked. A sweep's trainer that fell an epoch behind would otherwise find
        each epoch's group gone and read alone for good; the one that leads waits up to
        ``lag_wait`` for it (each that comes, another ``lag_wait``), then expects no one.
        """
        deadline = time.monotonic() + self.lag_wait
        while (waiting := self.expected.total()) and self._leads(sub):
            left = deadline - time.monotonic()
            if left <= 0:
                self.expected.clear()
                return
            self.cond.wait(min(left, _POLL_S))
            if self.expected.total() < waiting:  # one came
                deadline = time.monotonic() + self.lag_wait

    def _leads(self, sub: Subscription) -> bool:
        """Whether ``sub`` is ``per_stream`` buffers or more past the group's first one."""
        mine = self.positions.get(sub)
        if mine is None or not self.first:
            return False
        start = min(self.first.values())
        return mine[0] > start[0] or mine[1] - start[1] >= self.per_stream


def _referenced(value: object) -> bool:
    """Whether something besides the group refers to a part of a piece (a tuple)."""
    if not isinstance(value, tuple):
        return False
    # references to each part: the tuple, the loop variable, getrefcount's argument
    return any(sys.getrefcount(part) > _PART_REFS for part in value)


class Subscription:
    """One stream's membership of a group; :meth:`get` each piece in span order.

    Created by :meth:`SharedReads.subscribe`; :meth:`close` (or the ``with`` block's
    end) unsubscribes. Not thread-safe itself: one stream's read-ahead thread calls
    :meth:`get`, any thread may call :meth:`close`.
    """

    def __init__(
        self,
        registry: SharedReads,
        group: _Group,
        framing: Hashable,
        cancelled: threading.Event | None,
        counted: Callable[[str], None] | None,
    ) -> None:
        self._registry = registry
        self._group = group
        self._framing = framing
        self._cancelled = cancelled
        self._counted = counted
        self.attached = True
        self.closed = False
        self.finished = False  # past its last piece (see finish)
        self.reads = self.shared = 0  # pieces this stream read / took from another's read
        with group.cond:  # until its first piece it may need any buffer of the epoch
            group.positions[self] = (0, 0)

    def has_peers(self) -> bool:
        """Return whether other streams are attached to the group now (no lock: a hint)."""
        return len(self._group.positions) > (self in self._group.positions)

    def detach(self) -> None:
        """Leave the group's positions: read own buffers, pin none (called locked)."""
        self.attached = False
        self._group.positions.pop(self, None)
        self._group.prune()

    def get(self, piece: Piece, read: Callable[[BufferPool], T], own_pool: BufferPool) -> T | None:
        """Return ``read``'s result for ``piece``, reading it only if no stream has.

        Parameters
        ----------
        piece
            The next piece of the stream's span (buffers in increasing order).
        read
            Reads and prepares the piece's rows with arrays from the given pool;
            called at most once per piece and group, on the calling thread.
        own_pool
            The stream's pool, for a piece read for this stream alone (detached, or
            another stream holds a different piece of that buffer).

        Returns
        -------
        The prepared piece (shared with other streams: never written to), or None if
        the stream's ``cancelled`` event was set while it waited for another's read.
        """
        g = self._group
        with g.cond:
            entry = g.entries.get(piece.buffer)
            same = entry is not None and (entry.start, entry.stop) == (piece.start, piece.stop)
            if not self.closed and (self.attached or same):
                self.attached = True
                g.positions[self] = piece.buffer
                g.first.setdefault(self._framing, piece.buffer)
                g.prune()
                g.cond.notify_all()  # a stream waiting for room (make_room) may have it
            mine = False
            if not self.attached or (entry is not None and not same):
                entry = None
            elif entry is None and g.make_room(self):
                # make_room may have waited, unlocked: another stream may have claimed it
                entry = g.entries.get(piece.buffer)
                if entry is None:
                    entry = g.entries[piece.buffer] = _Entry(piece.start, piece.stop)
                    mine = True
                elif (entry.start, entry.stop) != (piece.start, piece.stop):
                    entry = None
            elif not same:
                entry = None
        if entry is None:
            return self._read(read, own_pool)
        if mine:
            return self._publish(g, entry, read)
        with g.cond:
            while not entry.done:
                if self._cancelled is not None and self._cancelled.is_set():
                    return None
                g.cond.wait(_POLL_S)
            value = entry.value
        if entry.failed:  # the reader's error is its own; this stream reads, and raises
            return self._read(read, own_pool)
        self.shared += 1
        if self._counted is not None:
            self._counted("shared")
        return value

    def _read(self, read: Callable[[BufferPool], T], pool: BufferPool) -> T:
        value = read(pool)
        self.reads += 1
        if self._counted is not None:
            self._counted("read")
        return value

    def _publish(self, g: _Group, entry: _Entry, read: Callable[[BufferPool], T]) -> T:
        try:
            value = self._read(read, g.pool)
        except BaseException:
            with g.cond:
                entry.failed = entry.done = True
                for buffer in [b for b, e in g.entries.items() if e is entry]:
                    del g.entries[buffer]
                g.cond.notify_all()
            raise
        with g.cond:
            entry.value, entry.done = value, True
            g.cond.notify_all()
        return value

    def finish(self) -> None:
        """Say the stream has got its last piece: the next epoch's group expects it no more.

        Its trainer is then about to start that epoch itself (a stream still reading is
        another trainer's, a moment behind). Idempotent; :meth:`close` calls it.
        """
        if not self.finished:
            self.finished = True
            self._registry._finished(self._group, self._framing)

    def close(self) -> None:
        """Unsubscribe: release the buffers this stream pinned; idempotent."""
        with self._group.cond:
            if self.closed:
                return
            self.closed = True
            self.detach()
        self.finish()
        self._registry._left(self._group, self._framing)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SharedReads:
    """Registry of the groups of streams that read the same preload buffers.

    One per daemon (process-wide: :data:`REGISTRY`); tests may make their own.

    Parameters
    ----------
    buffers_per_stream
        Buffers a group holds per attached stream, at most (> 0); more detach the
        streams furthest behind.
    lag_wait
        Seconds a stream that needs room waits for the streams close behind it
        before detaching them (>= 0).
    """

    def __init__(
        self, buffers_per_stream: int = BUFFERS_PER_STREAM, lag_wait: float = LAG_WAIT_S
    ) -> None:
        if buffers_per_stream < 1:
            msg = f"buffers_per_stream must be >= 1, got {buffers_per_stream}"
            raise ValueError(msg)
        if lag_wait < 0:
            msg = f"lag_wait must be >= 0, got {lag_wait}"
            raise ValueError(msg)
        self.buffers_per_stream = buffers_per_stream
        self.lag_wait = lag_wait
        self._lock = threading.Lock()
        self._groups: dict[Hashable, _Group] = {}
        self._ended: dict[Hashable, tuple[Counter[Hashable], float]] = {}  # peak, when

    def subscribe(
        self,
        store: Store,
        plan: StreamPlan,
        cancelled: threading.Event | None = None,
        counted: Callable[[str], None] | None = None,
    ) -> Subscription:
        """Join the group of streams reading what ``plan`` reads from ``store``.

        Parameters
        ----------
        store
            The stream's store.
        plan
            The validated request (:func:`read_key` picks the group).
        cancelled
            The stream's event: set, a wait for another stream's read ends.
        counted
            Called with ``"read"`` (this stream read a piece from the store) or
            ``"shared"`` (another stream's read served it) per piece, e.g. a
            Prometheus counter's ``inc`` by label.

        Returns
        -------
        The stream's subscription; close it when the stream ends.
        """
        key, framing = read_key(store, plan), frame_key(plan)
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(
                    key, store, self.buffers_per_stream, self.lag_wait
                )
                if plan.epoch > 0:  # the previous epoch's streams come next
                    before = read_key(store, dataclasses.replace(plan, epoch=plan.epoch - 1))
                    group.expected = self._successors(before, framing)
            else:
                with group.cond:
                    if group.expected[framing] > 0:  # one of them came
                        group.expected[framing] -= 1
                        group.cond.notify_all()  # a stream waiting for it (make_room)
            group.members[framing] += 1
            group.peak[framing] = max(group.peak[framing], group.members[framing])
            group.reading[framing] += 1
        return Subscription(self, group, framing, cancelled, counted)

    def _finished(self, group: _Group, framing: Hashable) -> None:
        with self._lock:
            group.reading[framing] -= 1

    def _successors(self, before: Hashable, framing: Hashable) -> Counter[Hashable]:
        """Return the streams a new epoch's group expects, by frame_key (called locked).

        Each of the previous epoch's trainers (its group's peak of members) comes, less
        the one here (``framing``'s), and at least those still reading it. Whether a
        stream has got its last piece says little: its read-ahead gets there a queue of
        frames before its trainer is done (four trainers started an epoch ~150 ms
        apart, and each but the first read its first three buffers itself). Trainers
        in lock step may all have ended the previous epoch's streams before the first
        starts the next: an ended group's peak counts for :data:`REMEMBER_S`.
        """
        here = Counter({framing: 1})
        group = self._groups.get(before)
        if group is not None:
            return (group.peak - here) | group.reading
        peak, ended = self._ended.get(before, (Counter(), 0.0))
        return peak - here if ended > time.monotonic() - REMEMBER_S else Counter()

    def _left(self, group: _Group, framing: Hashable) -> None:
        with self._lock:
            group.members[framing] -= 1
            if not +group.members and self._groups.get(group.key) is group:
                del self._groups[group.key]
                now = time.monotonic()
                old = [k for k, (_, ended) in self._ended.items() if ended < now - REMEMBER_S]
                for key in old:
                    del self._ended[key]
                self._ended[group.key] = (group.peak, now)

    def groups(self) -> int:
        """Return the number of groups with a subscribed stream."""
        with self._lock:
            return len(self._groups)

    def buffers(self) -> int:
        """Return the buffers held for sharing, all groups together."""
        with self._lock:
            groups = list(self._groups.values())
        total = 0
        for g in groups:
            with g.cond:
                total += len(g.entries)
        return total


#: The daemon's registry.
REGISTRY = SharedReads()
