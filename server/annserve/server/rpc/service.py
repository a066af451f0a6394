"""The gRPC servicer: validates requests, calls the core, maps errors to status codes."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc

from annserve.errors import (
    QUOTE_CHARS,
    AnnServeError,
    InvalidRequestError,
    ServerUnavailableError,
    StoreFormatError,
    StoreNotFoundError,
    listed,
    quoted,
)
from annserve.memory import TRIM_THRESHOLD, trim_freed_memory
from annserve.prefetch import Prefetcher
from annserve.server.io.fingerprint import fingerprint
from annserve.server.plan.epoch import from_batch
from annserve.server.plan.limits import Limits
from annserve.server.plan.request import plan_stream
from annserve.server.plan.selection import make_sampler
from annserve.server.rpc.describe import store_info
from annserve.server.rpc.handlers import end_call, status_set
from annserve.server.rpc.metrics import Metrics
from annserve.server.stream.frames import Sharing, epoch_frames, epoch_span, stays_mapped
from annserve.server.stream.shared import (
    REGISTRY,
    SharedReads,
    Subscription,
    sweep_key,
)
from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from pathlib import Path

    from annserve.server.io.store import Store
    from annserve.server.plan.epoch import Span
    from annserve.server.plan.request import StreamPlan
    from annserve.server.plan.sampler import Sampler
    from annserve.server.rpc.bulk import BulkListener
    from annserve.server.rpc.shm import Session, SharedFrame, SharedMemoryListener
    from annserve.server.stream.frames import Frame, Pack
    from annserve.wire import FrameArray

logger = logging.getLogger(__name__)

SERVICE_NAME = "annserve.v1.AnnServe"

#: Frames that may wait between the preload thread and the gRPC send loop.
FRAME_QUEUE = 16
#: Seconds a stream may wait for its client to take a frame before it ends with
#: ``DEADLINE_EXCEEDED`` (``--stall-timeout``).
STALL_TIMEOUT_S = 60.0
#: Most seconds between two checks for stalled streams (and for freed memory).
STALL_CHECK_S = 1.0
#: Seconds a stream waits for the previous stream of its shared-memory session to end.
SESSION_WAIT_S = 5.0
#: Waits without streams (s) after each of which all freed memory goes back to the OS:
#: the first soon after the last stream ends (a client's next epoch comes sooner), the
#: later ones for memory that a busy machine's threads freed only after it.
IDLE_TRIMS_S = (0.25, 1.0, 4.0)


def status_of(error: AnnServeError) -> grpc.StatusCode:
    """Return the gRPC status code of an annserve error (its class's ``grpc_status``).

    ``INTERNAL`` for errors that name none.
    """
    return grpc.StatusCode[error.grpc_status or "INTERNAL"]


def _sent_span(sampler: Sampler, plan: StreamPlan) -> Span:
    """Return the positions of the epoch a stream sends: its shard, from ``start_batch`` on.

    Raises
    ------
    OutOfRangeError
        If ``plan.start_batch`` is past the shard's number of batches.
    """
    _, span = epoch_span(sampler, plan)
    return from_batch(span, plan.batch_size, plan.start_batch)


def _public(message: str, path: Path, name: str) -> str:
    """Name a store by its configured name in a client's message, never by its path.

    Messages raised while reading name elements as ``<store path>/<element>``; clients
    know the store only by name (server paths are not theirs to see).
    """
    return message.replace(str(path), f"store {name!r}")


class StreamSlots(Protocol):
    """``--max-streams`` slots shared with other processes (``annserve --workers N``)."""

    def acquire(self, limit: int) -> int:
        """Take a slot when fewer than ``limit`` are taken; return how many were taken before."""

    def release(self) -> None:
        """Give back a slot this process took."""


class FrameWriter(Protocol):
    """Where a stream's frames go out of band: a shared-memory session or a bulk connection."""

    def pack(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[tuple[str, FrameArray]],
        timeout: float,
        cancelled: threading.Event,
    ) -> bytes:
        """Write a frame out of band; return the gRPC message that points to it.

        Parameters
        ----------
        header, arrays
            The frame, as for :func:`annserve.wire.encode_frame` (``header`` is filled).
        timeout
            Seconds the client may leave the writer waiting (for a free slot, or for
            it to take a byte) before the stream is stalled.
        cancelled
            Set when the stream is over; a wait for the client then ends.

        Raises
        ------
        StreamStalledError
            If the client makes no room for ``timeout`` seconds.
        ServerUnavailableError
            If the client closed its session or connection, or the stream was
            cancelled, meanwhile.
        """


@dataclass(eq=False, slots=True)
class _OpenStream:
    """A stream in flight, as the stall watch sees it.

    Attributes
    ----------
    context
        Its call.
    frames
        Its frames read ahead; None while it is being planned.
    waiting_since
        ``time.monotonic()`` when it yielded a frame grpc has not yet asked past, seconds;
        None while the stream works (plans, reads, encodes).
    stalled
        Whether the stall watch ended it.
    """

    context: grpc.ServicerContext
    frames: Prefetcher[Frame] | None = None
    waiting_since: float | None = None
    stalled: bool = False


class AnnServeService:
    """Handlers of the ``annserve.v1.AnnServe`` service over a set of named stores.

    Parameters
    ----------
    stores
        Store by name; the first one is the default for requests naming none.
    limits
        Limits enforced on every stream; default :class:`Limits`.
    metrics
        Where the streams are counted; default: a fresh :class:`Metrics`.
    stall_timeout
        Seconds a stream may wait for its client to take the next frame; then it ends
        with ``DEADLINE_EXCEEDED``, freeing its slot, buffers and threads.
    slots
        Where ``max_streams`` is counted when other processes serve the same address
        (``--workers``); default: this service's open streams only.
    shared_memory
        Side socket of the same-host shared-memory transport; None: requests naming
        an ``shm_session`` are refused.
    bulk
        Listener of the bulk channel of remote streams, whose port ``DescribeStore``
        announces; None: no port is announced, and requests naming a ``bulk_session``
        stream inline.
    shared_reads
        Where streams that read the same preload buffers share one read
        (:mod:`annserve.server.stream.shared`); default the daemon's registry, None
        reads every buffer per stream (``--no-shared-reads``).

    Raises
    ------
    ValueError
        If ``stores`` is empty or ``stall_timeout`` is not positive.
    """

    def __init__(
        self,
        stores: Mapping[str, Store],
        limits: Limits | None = None,
        metrics: Metrics | None = None,
        stall_timeout: float = STALL_TIMEOUT_S,
        slots: StreamSlots | None = None,
        shared_memory: SharedMemoryListener | None = None,
        shared_reads: SharedReads | None = REGISTRY,
        bulk: BulkListener | None = None,
    ) -> None:
        if not stores:
            msg = "at least one store is required"
            raise ValueError(msg)
        if not stall_timeout > 0:
            msg = f"stall_timeout must be > 0 seconds, got {stall_timeout}"
            raise ValueError(msg)
        self.stall_timeout = stall_timeout
        self._slots = slots
        self.shared_memory = shared_memory
        self.bulk = bulk
        self.shared_reads = shared_reads
        self._stores = dict(stores)
        self._fingerprints = {name: fingerprint(store) for name, store in self._stores.items()}
        self._default = next(iter(self._stores))
        self._stream_ids = itertools.count(1)
        self.limits = limits if limits is not None else Limits()
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.frames_queued.set_function(self.frames_queued)
        # open streams by id, guarded by _idle's lock, as is the thread watching them
        self._open: dict[int, _OpenStream] = {}
        self._idle = threading.Condition()
        self._watch: threading.Thread | None = None
        self._draining = threading.Event()  # refuse new streams
        self._stopping = threading.Event()  # end in-flight streams at their next frame

    def _store(self, name: str) -> Store:
        try:
            return self._stores[name or self._default]
        except KeyError:
            msg = f"store: unknown store {quoted(name)}; configured: {listed(self._stores)}"
            raise StoreNotFoundError(msg) from None

    def describe_store(
        self, request: pb.DescribeStoreRequest, context: grpc.ServicerContext
    ) -> pb.StoreInfo:
        """Handle ``DescribeStore``."""
        try:
            store = self._store(request.store)
        except AnnServeError as e:
            context.abort(status_of(e), str(e))
        name = request.store or self._default
        info = store_info(store, name, self._fingerprints[name])
        info.bulk_port = self.bulk.port if self.bulk is not None else 0
        return info

    def _plan(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> tuple[Store, StreamPlan, Sampler]:
        """Validate a request and build its sampler, aborting the call on bad input.

        A ``start_batch`` past the shard's batches aborts with ``OUT_OF_RANGE``.
        """
        try:
            store = self._store(request.store)
            self._check_fingerprint(request)
            plan = plan_stream(request, store)
            self.limits.check_request(plan, store)
            sampler = make_sampler(store, plan)
            _sent_span(sampler, plan)  # raises OutOfRangeError for start_batch
            return store, plan, sampler
        except AnnServeError as e:
            context.abort(status_of(e), str(e))
        except Exception:
            logger.exception("cannot plan a stream for %s", quoted(str(request)))
            context.abort(grpc.StatusCode.INTERNAL, "cannot plan this stream; see server log")
        raise AssertionError  # context.abort raises

    def _check_fingerprint(self, request: pb.StreamBatchesRequest) -> None:
        """Refuse a request expecting another store's content (a replica of another store).

        Raises
        ------
        StoreFormatError
            If ``request.store_fingerprint`` is given and differs from the store's.
        """
        name = request.store or self._default
        ours, theirs = self._fingerprints[name], request.store_fingerprint
        if theirs and theirs != ours:
            msg = (
                f"store_fingerprint: this server ({socket.gethostname()}) serves store "
                f"{name!r} with fingerprint {ours}, the client expects {quoted(theirs)} (the "
                "fingerprint of the replica it described first): replicas behind one "
                "address must serve the same store content"
            )
            raise StoreFormatError(msg)

    def count_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> pb.EpochSize:
        """Handle ``CountBatches``: what the stream would send from ``start_batch`` on.

        Rows and batches of the shard's epoch, computed without reading data.
        """
        _, plan, sampler = self._plan(request, context)
        span = _sent_span(sampler, plan)
        n_rows = span.stop - span.start
        return pb.EpochSize(n_rows=n_rows, n_batches=-(-n_rows // plan.batch_size))

    def stream_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Handle ``StreamBatches``: yield serialized frames read ahead in a background thread.

        A client that takes no frame for ``stall_timeout`` seconds gets ``DEADLINE_EXCEEDED``.
        """
        started = time.monotonic()
        # claimed first: the connection of a refused stream closes with its call; a
        # token this daemon does not hold (another replica's or worker's) goes inline
        connection = self.bulk.claim(request.bulk_session) if self.bulk is not None else None
        try:
            stream_id, entry = self._admit(context)
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        frames: Prefetcher[Frame] | None = None
        session: Session | None = None
        reads: Subscription | None = None
        cancelled = threading.Event()  # stops the read-ahead, also while it skips ahead
        status = "OK"
        meter = None
        try:
            if request.bulk_session and connection is None:
                logger.info(
                    "stream %d names a bulk connection this daemon does not hold: inline",
                    stream_id,
                    extra={"stream_id": stream_id},
                )
            store, plan, sampler = self._plan(request, context)
            name = request.store or self._default
            meter = self.metrics.stream(name)
            on_read = self.metrics.store_read_seconds.labels(name).observe
            context.add_callback(cancelled.set)
            session = self._session(request.shm_session, request.shm_held)
            if session is not None:
                self.limits.check_shared_memory(plan, store, session.n_slots)
            if session is not None or connection is not None:
                mapped = stays_mapped(store, plan, remote=connection is not None)
                plan = dataclasses.replace(plan, mapped=mapped)
            pack = self._packer(session or connection, cancelled)
            sharing = None
            if self.shared_reads is not None:
                reads = self.shared_reads.subscribe(
                    store, plan, cancelled, self.metrics.preload_buffers_of(name)
                )
                if session is not None and request.shm_shared_frames:
                    sharing = self._sharing(session, cancelled, store, plan)
            frames = Prefetcher(
                lambda: epoch_frames(
                    store, sampler, plan, on_read, cancelled, pack, reads, sharing
                ),
                FRAME_QUEUE,
                name=f"annserve-stream-{stream_id}",
            )
            entry.frames = frames
            context.add_callback(frames.close)
            # the client can name its request (x-request-id) and learn the server's stream id
            request_id = dict(context.invocation_metadata() or ()).get("x-request-id", "-")
            context.send_initial_metadata((("annserve-stream-id", str(stream_id)),))
            logger.info(
                "stream %d start: peer=%s request_id=%s store=%s epoch=%d batch_size=%d "
                "chunk_size=%d preload_nchunks=%d shard=%d/%d start_batch=%d",
                stream_id,
                context.peer(),
                request_id[:QUOTE_CHARS],
                name,
                plan.epoch,
                plan.batch_size,
                plan.chunk_size,
                plan.preload_nchunks,
                plan.shard.index,
                plan.shard.count,
                plan.start_batch,
                extra={"stream_id": stream_id},
            )
            max_bytes = self.limits.max_message_bytes
            for frame in frames:
                if self._stopping.is_set():
                    msg = (
                        f"annserve is shutting down: stream {stream_id} ended after "
                        f"{meter.cells} rows ({meter.frames} frames); resume from the last "
                        "complete batch on another server or after a restart"
                    )
                    raise ServerUnavailableError(msg)
                if len(frame.data) > max_bytes:
                    raise self.limits.frame_too_large(len(frame.data))
                # counted before the yield: grpc resumes this generator only to ask for
                # the next frame, and on a cancel drops it, closing it at the yield
                meter.sent(frame)
                entry.waiting_since = time.monotonic()  # until grpc sent it and asks for more
                yield frame.data
                entry.waiting_since = None
            if not context.is_active():  # cancelled while waiting: frames.close ended the loop
                status = "CANCELLED"
        except GeneratorExit:
            status = "DEADLINE_EXCEEDED" if entry.stalled else "CANCELLED"
            raise
        except AnnServeError as e:
            status = status_of(e).name
            logger.warning("stream %d failed: %s", stream_id, e, extra={"stream_id": stream_id})
            context.abort(status_of(e), _public(str(e), store.path, name))
        except Exception:
            code, details = status_set(context)
            if code is not None:  # context.abort() in _plan
                status = code.name
                logger.info(
                    "stream %d refused: %s %s",
                    stream_id,
                    status,
                    details,
                    extra={"stream_id": stream_id},
                )
                raise
            status = "INTERNAL"
            logger.exception("stream %d failed", stream_id, extra={"stream_id": stream_id})
            context.abort(grpc.StatusCode.INTERNAL, f"stream {stream_id} failed; see server log")
        finally:
            cancelled.set()
            if frames is not None:
                frames.close()
            if reads is not None:
                reads.close()
            if session is not None:
                session.end()
            if connection is not None:
                connection.close()
            self._release(stream_id, started)
            if meter is not None:
                logger.info(
                    "stream %d end: status=%s frames=%d rows=%d bytes=%d seconds=%.3f",
                    stream_id,
                    status,
                    meter.frames,
                    meter.cells,
                    meter.nbytes,
                    time.monotonic() - started,
                    extra={"stream_id": stream_id},
                )

    def _session(self, token: bytes, held: Sequence[int]) -> Session | None:
        """Reserve the shared-memory session a request names; None for a plain stream.

        Raises
        ------
        InvalidRequestError
            If the token names no open session, or one in use, or this daemon has no
            side socket.
        """
        if not token:
            return None
        if self.shared_memory is None:
            msg = (
                "shm_session: this daemon serves no shared-memory sessions (it listens on "
                "no unix socket, or was started with --no-shared-memory)"
            )
            raise InvalidRequestError(msg)
        session = self.shared_memory.session(token)
        session.begin(held, SESSION_WAIT_S)
        return session

    def _packer(self, writer: FrameWriter | None, cancelled: threading.Event) -> Pack | None:
        """Return the frame writer of a shared-memory or bulk stream, None for a plain one.

        It waits for the client up to the stall timeout.
        """
        if writer is None:
            return None

        def pack(header: pb.BatchHeader, arrays: list[tuple[str, FrameArray]]) -> bytes:
            return writer.pack(header, arrays, self.stall_timeout, cancelled)

        return pack

    def _sharing(
        self, session: Session, cancelled: threading.Event, store: Store, plan: StreamPlan
    ) -> Sharing:
        """Return how a shared-memory stream shares frames: written once into its group's pool.

        The pool is its group's across epochs (:func:`sweep_key`): memfds
        reused from the previous epoch have their pages, a new one must have each page
        allocated and zeroed as it is first written (4 trainers over 8 epochs made 93
        memfds of ~30 MB).
        """
        assert self.shared_memory is not None
        pool = self.shared_memory.frame_pool(sweep_key(store, plan))

        def send(frame: SharedFrame) -> bytes:
            return session.point(frame, self.stall_timeout, cancelled)

        return Sharing("shm", pool.write, send, lambda frame: frame.header.payload_nbytes)

    # --- admission, stalls and shutdown ----------------------------------------------
    def _admit(self, context: grpc.ServicerContext) -> tuple[int, _OpenStream]:
        """Reserve a stream slot, aborting when draining or at ``max_streams``."""
        entry = _OpenStream(context)
        try:
            with self._idle:
                if self._draining.is_set():
                    msg = "annserve is shutting down and accepts no new streams; retry elsewhere"
                    raise ServerUnavailableError(msg)
                if self._slots is None:
                    self.limits.check_streams(len(self._open))
                else:  # all processes of the daemon together; a refused stream takes none
                    self.limits.check_streams(self._slots.acquire(self.limits.max_streams))
                stream_id = next(self._stream_ids)
                self._open[stream_id] = entry
                if self._watch is None:
                    self._watch = threading.Thread(
                        target=self._watch_streams, name="annserve-watch", daemon=True
                    )
                    self._watch.start()
        except AnnServeError as e:
            logger.warning("refused a stream from %s: %s", context.peer(), e)
            context.abort(status_of(e), str(e))
        self.metrics.active_streams.inc()
        return stream_id, entry

    def _release(self, stream_id: int, started: float) -> None:
        with self._idle:
            del self._open[stream_id]
            if self._slots is not None:
                self._slots.release()
            self._idle.notify_all()
        self.metrics.active_streams.dec()
        self.metrics.stream_seconds.observe(time.monotonic() - started)

    def _watch_streams(self) -> None:
        """End stalled streams and bound freed memory while streams are open.

        A stream whose client took no frame for ``stall_timeout`` s is ended; freed
        memory over :data:`~annserve.memory.TRIM_THRESHOLD` goes back to the OS. Without
        open streams, all freed memory goes back after each wait of
        :data:`IDLE_TRIMS_S`, and the watch ends after the last.
        """
        interval = min(STALL_CHECK_S, self.stall_timeout / 4)
        while self._wait_for_streams():
            with self._idle:
                stalled = self._stalled(time.monotonic() - self.stall_timeout)
            for stream_id, entry in stalled:
                self._end_stalled(stream_id, entry)
            trim_freed_memory(TRIM_THRESHOLD)
            with self._idle:
                self._idle.wait(interval)  # or until a stream ends

    def _wait_for_streams(self) -> bool:
        """Return True once a stream is open; False, ending the watch, after idle trims.

        A trim takes ~50 ms per 500 MB and holds malloc's lock.
        """
        for n, wait in enumerate(IDLE_TRIMS_S, 1):
            with self._idle:
                if self._idle.wait_for(lambda: bool(self._open), wait):
                    return True
                if n == len(IDLE_TRIMS_S):
                    self._watch = None  # a stream opened from now on starts a new watch
            trim_freed_memory()
        return False

    def _stalled(self, deadline: float) -> list[tuple[int, _OpenStream]]:
        """Return the streams waiting for their client since before ``deadline`` (monotonic s)."""
        return [
            (stream_id, entry)
            for stream_id, entry in self._open.items()
            if not entry.stalled
            and entry.waiting_since is not None
            and entry.waiting_since < deadline
        ]

    def _end_stalled(self, stream_id: int, entry: _OpenStream) -> None:
        entry.stalled = True
        msg = (
            f"stream {stream_id} stalled: its client took no frame for "
            f"{self.stall_timeout:g} s (the server's stall timeout, --stall-timeout); "
            "resume from the last complete batch"
        )
        logger.warning("%s; ending it", msg, extra={"stream_id": stream_id})
        end_call(entry.context, grpc.StatusCode.DEADLINE_EXCEEDED, msg)

    def open_streams(self) -> int:
        """Return the number of streams in flight."""
        with self._idle:
            return len(self._open)

    def frames_queued(self) -> int:
        """Return the frames encoded and waiting to be sent, all streams together."""
        with self._idle:
            return sum(e.frames.pending for e in self._open.values() if e.frames is not None)

    def drain(self) -> None:
        """Refuse new streams (``UNAVAILABLE``); streams in flight go on."""
        self._draining.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every stream to end; return whether they did."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._open, timeout)

    def stop_streams(self) -> None:
        """End every stream in flight at its next frame with ``UNAVAILABLE`` (and refuse new)."""
        self._draining.set()
        self._stopping.set()
