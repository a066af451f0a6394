"""The daemon's side of the same-host shared-memory transport (see :mod:`annserve.shm`).

:class:`SharedMemoryListener` accepts side-socket connections; each one is a
:class:`Session`: a ring of memfd slots, handed to the client once. A stream naming
the session writes each frame into a free slot with ``pwritev`` (the frame's arrays
are gathered from the preload buffer by that one copy, see
:mod:`annserve.server.rpc.gather`; the daemon never maps the slots) and sends only
the header over gRPC. The client's releases come back on the side socket and free
slots; a stream waits for one (back-pressure).

Identical streams (a sweep's trainers, :mod:`annserve.server.stream.shared`) share
frames instead: a :class:`FramePool` of their group writes each frame once into a
memfd of its own (:class:`SharedFrame`), and every session points to it
(:meth:`Session.point`), sending the memfd over the side socket the first time a
stream points to it. A session holds at most ``n_slots`` writes of either kind.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import secrets
import socket
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING

from annserve import shm
from annserve.errors import InvalidRequestError, ServerUnavailableError, StreamStalledError
from annserve.server.rpc.gather import pwrite_parts
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import frame_parts

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

    from annserve.wire import FrameArray

logger = logging.getLogger(__name__)

#: A slot grows to this much more than the frame that did not fit.
_GROWTH = 1.25
#: Seconds between checks of a stream's cancellation while it waits for a slot.
_POLL_S = 0.1
_memfd_ids = itertools.count(1)  # ids of shared memfds, unique in the daemon


class SharedFrame:
    """A frame written once into a memfd of a :class:`FramePool`, for every session.

    The memfd goes back to its pool when this object is gone: no session holds the
    write any more and no stream can point to it (the piece's frames were dropped).

    Attributes
    ----------
    memfd_id
        The memfd's id, unique in the daemon (``BatchHeader.shm_shared``).
    fd
        The memfd's descriptor (the pool's).
    nbytes
        Bytes of the frame, from offset 0.
    header
        The frame's header (batch number and rows, for each stream's pointer).
    """

    __slots__ = ("__weakref__", "fd", "header", "memfd_id", "nbytes")

    def __init__(
        self, pool: FramePool, memfd: tuple[int, int, int], nbytes: int, header: pb.BatchHeader
    ) -> None:
        self.memfd_id, self.fd, _ = memfd
        self.nbytes = nbytes
        self.header = header
        weakref.finalize(self, pool.give_back, memfd)


class FramePool:
    """The memfds of one group of identical streams' shared frames, reused once released.

    A memfd never grows (a client maps it once) and holds frames of this group only:
    a session is only ever sent memory holding frames its own request asks for. Created
    by :meth:`SharedMemoryListener.frame_pool`; the pool lives while a stream or frame
    uses it, and closes its free memfds when it goes. It keeps every released memfd,
    so it holds as many as its peak of frames held at once (bounded by the sessions'
    slots and the streams' read-ahead): closing one and making another later cost
    the allocation and zeroing of each of its pages again.
    """

    def __init__(self) -> None:
        self._free: list[tuple[int, int, int]] = []  # (memfd_id, fd, capacity)
        self._lock = threading.Lock()
        weakref.finalize(self, _close_memfds, self._free)

    def write(
        self, header: pb.BatchHeader, arrays: Sequence[tuple[str, FrameArray]]
    ) -> SharedFrame:
        """Write a frame into a free memfd (a new one if none fits); see :meth:`Session.pack`.

        Raises
        ------
        OSError
            If no memfd can be created or written.
        """
        parts, nbytes = frame_parts(header, arrays)
        memfd = self._take(nbytes)
        try:
            pwrite_parts(memfd[1], parts, 0)
        except BaseException:
            self.give_back(memfd)
            raise
        return SharedFrame(self, memfd, nbytes, header)

    def _take(self, nbytes: int) -> tuple[int, int, int]:
        with self._lock:
            fits = [m for m in self._free if m[2] >= nbytes]
            if fits:
                memfd = min(fits, key=lambda m: m[2])
                self._free.remove(memfd)
                return memfd
        capacity = _capacity(nbytes)
        fd = os.memfd_create("annserve-shared", os.MFD_CLOEXEC)
        os.ftruncate(fd, capacity)
        return next(_memfd_ids), fd, capacity

    def give_back(self, memfd: tuple[int, int, int]) -> None:
        """Take a memfd back once no frame in it is held."""
        with self._lock:
            self._free.append(memfd)


def _capacity(nbytes: int) -> int:
    """Bytes to give a memfd for a frame of ``nbytes``: room to grow, whole pages."""
    return -(-int(nbytes * _GROWTH) // mmap.PAGESIZE) * mmap.PAGESIZE


def _close_memfds(memfds: list[tuple[int, int, int]]) -> None:
    for _, fd, _ in memfds:
        os.close(fd)
    memfds.clear()


class Session:
    """One client's shared-memory slots and the side socket its releases arrive on.

    Parameters
    ----------
    conn
        The accepted side-socket connection.
    n_slots
        Slots (memfds) of the ring.
    """

    def __init__(self, conn: socket.socket, n_slots: int) -> None:
        self.token = secrets.token_bytes(shm.TOKEN_BYTES)
        self._conn = conn
        self._fds = [os.memfd_create(f"annserve-slot-{i}", os.MFD_CLOEXEC) for i in range(n_slots)]
        self._sizes = [0] * n_slots
        self._free: deque[int] = deque(range(n_slots))
        # slot (or shared frame) of each write the client holds, by seq
        self._written: dict[int, int | SharedFrame] = {}
        self._announced: set[int] = set()  # shared memfds sent to the client in this stream
        self._seq = 0  # writes so far
        self._cond = threading.Condition()
        self._closed = False  # the client left (or broke the protocol)
        self._busy = False  # a stream writes into the slots

    @property
    def n_slots(self) -> int:
        """Slots of the ring."""
        return len(self._fds)

    def run(self) -> None:
        """Hand the slots over, then take releases until the client closes the socket.

        Runs on the session's own thread; the slots' descriptors are closed at the
        end, or when the stream using them ends after that.
        """
        try:
            socket.send_fds(self._conn, [shm.MAGIC + self.token], self._fds)
            while message := self._conn.recv(shm.MAX_MESSAGE):
                self._released(shm.parse_releases(message))
        except (OSError, ValueError) as e:
            logger.warning("shared-memory session ended by a bad message or error: %s", e)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
                if not self._busy:
                    self._close_fds()
            self._conn.close()

    def _released(self, seqs: list[int]) -> None:
        with self._cond:
            for seq in seqs:
                self._take_back(self._written.pop(seq, None))  # None: taken back already
            self._cond.notify_all()

    def _take_back(self, slot: int | SharedFrame | None) -> None:
        """Free a write's slot (called locked); a shared frame's memfd is its pool's."""
        if isinstance(slot, int):
            self._free.append(slot)

    def begin(self, held: Sequence[int], wait: float) -> None:
        """Reserve the session for one stream; take back the slots the client does not hold.

        Parameters
        ----------
        held
            Writes (``shm_seq``) the client still reads; every other written slot is
            free again (frames of an earlier stream that the client never received).
        wait
            Seconds to wait for an earlier stream of the session to end (a client
            that abandoned an epoch starts the next one at once).

        Raises
        ------
        InvalidRequestError
            If another stream still uses it after ``wait``, or its client has left.
        """
        keep = set(held)
        with self._cond:
            self._cond.wait_for(lambda: not self._busy or self._closed, wait)
            if self._busy or self._closed:
                state = "in use by another stream" if not self._closed else "closed by its client"
                msg = f"shm_session: the shared-memory session is {state}"
                raise InvalidRequestError(msg)
            for seq in [s for s in self._written if s not in keep]:
                self._take_back(self._written.pop(seq))
            self._announced.clear()  # the client maps anew each stream's shared memfds
            self._busy = True

    def end(self) -> None:
        """End the stream's use of the session; slots it wrote stay the client's to release."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            if self._closed:
                self._close_fds()

    def pack(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[tuple[str, FrameArray]],
        timeout: float,
        cancelled: threading.Event,
    ) -> bytes:
        """Write a frame into a free slot; return the message that points to it.

        As :meth:`annserve.server.rpc.service.FrameWriter.pack`; ``timeout`` is how long to
        wait for the client to free a slot.
        """
        parts, nbytes = frame_parts(header, arrays)
        seq, slot = self._take(timeout, cancelled)
        assert isinstance(slot, int)
        fd = self._fds[slot]
        if nbytes > self._sizes[slot]:
            self._sizes[slot] = _capacity(nbytes)
            os.ftruncate(fd, self._sizes[slot])
        pwrite_parts(fd, parts, 0)
        pointer = pb.BatchHeader(
            batch=header.batch, n_rows=header.n_rows, shm_slot=slot, shm_nbytes=nbytes, shm_seq=seq
        )
        return pb.BatchFrame(header=pointer).SerializeToString()

    def point(self, frame: SharedFrame, timeout: float, cancelled: threading.Event) -> bytes:
        """Return the gRPC message that points to a shared frame; the client holds it.

        The frame's memfd is sent on the side socket first, once per stream. Waits and
        raises as :meth:`pack` does (a shared frame counts as a slot while held).
        """
        seq, _ = self._take(timeout, cancelled, frame)
        if frame.memfd_id not in self._announced:
            try:
                # never blocks: a client that reads no announcements fills its socket
                socket.send_fds(
                    self._conn, [shm.announce(frame.memfd_id)], [frame.fd], socket.MSG_DONTWAIT
                )
            except OSError as e:
                msg = f"the client's shared-memory session takes no shared frame: {e}"
                raise ServerUnavailableError(msg) from e
            self._announced.add(frame.memfd_id)
        pointer = pb.BatchHeader(
            batch=frame.header.batch,
            n_rows=frame.header.n_rows,
            shm_nbytes=frame.nbytes,
            shm_seq=seq,
            shm_shared=frame.memfd_id,
        )
        return pb.BatchFrame(header=pointer).SerializeToString()

    def _take(
        self, timeout: float, cancelled: threading.Event, frame: SharedFrame | None = None
    ) -> tuple[int, int | SharedFrame]:
        """Return the number of a new write and what it holds: a free slot, or ``frame``.

        Waits until the client holds fewer than ``n_slots`` writes (then a slot is free).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._written) >= self.n_slots:
                if self._closed or cancelled.is_set():
                    msg = "the client closed its shared-memory session"
                    raise ServerUnavailableError(msg)
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = (
                        f"stream stalled: its client freed no shared-memory slot for "
                        f"{timeout:g} s (the server's stall timeout, --stall-timeout); "
                        "resume from the last complete batch"
                    )
                    raise StreamStalledError(msg)
                self._cond.wait(min(left, _POLL_S))
            held = self._free.popleft() if frame is None else frame
            self._seq += 1
            self._written[self._seq] = held
            return self._seq, held

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class SharedMemoryListener:
    """Accepts shared-memory sessions on the side socket of a unix gRPC address.

    Parameters
    ----------
    path
        The side socket's path (:func:`annserve.shm.side_socket`); a stale socket
        file there is replaced.

    Raises
    ------
    OSError
        If the socket cannot be bound.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sessions: dict[bytes, Session] = {}
        self._pools: weakref.WeakValueDictionary[Hashable, FramePool] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if os.path.exists(path):
            os.unlink(path)
        self._sock.bind(path)
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._accept, name="annserve-shm", daemon=True)
        self._thread.start()

    def session(self, token: bytes) -> Session:
        """Return the session of a token.

        Raises
        ------
        InvalidRequestError
            If no open session has that token.
        """
        with self._lock:
            found = self._sessions.get(token)
        if found is None:
            msg = "shm_session: no open shared-memory session has this token"
            raise InvalidRequestError(msg)
        return found

    def frame_pool(self, key: Hashable) -> FramePool:
        """Return the frame pool of a group of identical streams (made on first use).

        Parameters
        ----------
        key
            What makes streams identical in every epoch
            (:func:`~annserve.server.stream.shared.sweep_key`). The pool lives while a
            stream holds it or a frame uses it.
        """
        with self._lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools[key] = FramePool()
            return pool

    def close(self) -> None:
        """Stop accepting sessions and remove the socket file (open sessions go on).

        The accept thread has ended when it returns: on Linux only ``shutdown`` wakes a
        thread blocked in ``accept``, ``close`` does not.
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="annserve-shm-session", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)  # for the hello only
        try:
            n_slots = shm.parse_hello(conn.recv(shm.MAX_MESSAGE))
        except (OSError, ValueError) as e:
            logger.warning("refused a shared-memory session: %s", e)
            with contextlib.suppress(OSError):
                conn.send(shm.REFUSED + str(e).encode()[: shm.MAX_MESSAGE - 4])
            conn.close()
            return
        conn.settimeout(None)
        session = Session(conn, n_slots)
        with self._lock:
            self._sessions[session.token] = session
        try:
            session.run()
        finally:
            with self._lock:
                del self._sessions[session.token]
