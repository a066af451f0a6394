"""The daemon's side of the bulk channel of remote streams (see :mod:`annserve.bulk`).

:class:`BulkListener` accepts TCP connections on the daemon's bulk port and hands
each a session token. A stream naming the token claims the connection
(:meth:`BulkListener.claim`) and writes each frame on it as one record
(:meth:`BulkConnection.pack`): the record's prefix, the frame's header and its arrays,
gathered by ``writev`` straight from the preload buffer or the store's mapped files,
so the daemon never builds the frame's bytes; the gRPC message carries the header
only. Back-pressure is TCP's window: a client that takes nothing for the stall
timeout ends the stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import select
import socket
import threading
import time
from typing import TYPE_CHECKING

from annserve import bulk
from annserve.errors import AnnServeError, ServerUnavailableError, StreamStalledError
from annserve.server.rpc.gather import send_parts
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import frame_parts

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annserve.wire import FrameArray

logger = logging.getLogger(__name__)

#: Seconds between checks of a stream's cancellation while its client's window is full.
_POLL_S = 0.1
#: Seconds a connection may wait for the stream that claims it; then it is closed.
UNCLAIMED_S = 60.0
#: Seconds a client has to send the hello.
HELLO_TIMEOUT_S = 5.0
#: Connections greeted and not yet claimed, at most; more are refused.
MAX_PENDING = 1024


class BulkConnection:
    """One client's bulk connection, claimed by one stream.

    Parameters
    ----------
    conn
        The accepted connection, greeted (the client has its token).
    """

    def __init__(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._conn = conn
        self.opened = time.monotonic()

    def fileno(self) -> int:
        """Return the socket's file descriptor (for ``poll``)."""
        return self._conn.fileno()

    def pack(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[tuple[str, FrameArray]],
        timeout: float,
        cancelled: threading.Event,
    ) -> bytes:
        """Send a frame as the connection's next record; return the message pointing to it.

        As :meth:`annserve.server.rpc.service.FrameWriter.pack`; ``timeout`` is how long the
        client may take no byte. Also raises :class:`~annserve.errors.DataLossError` if a
        mapped store file shrank under the frame's rows.
        """
        parts, nbytes = frame_parts(header, arrays)
        try:
            send_parts(
                self._conn.fileno(),
                [bulk.record_prefix(nbytes), *parts],
                lambda: self._wait_writable(timeout, cancelled),
            )
        except AnnServeError:
            raise
        except OSError as e:
            msg = f"the client's bulk connection failed: {e}"
            raise ServerUnavailableError(msg) from e
        pointer = pb.BatchHeader(batch=header.batch, n_rows=header.n_rows, bulk_nbytes=nbytes)
        return pb.BatchFrame(header=pointer).SerializeToString()

    def _wait_writable(self, timeout: float, cancelled: threading.Event) -> None:
        """Wait until the socket takes bytes again: the client read some of a record."""
        poller = select.poll()
        poller.register(self._conn, select.POLLOUT)
        deadline = time.monotonic() + timeout
        while not poller.poll(_POLL_S * 1000):
            if cancelled.is_set():
                msg = "the stream ended while its client's bulk connection was full"
                raise ServerUnavailableError(msg)
            if time.monotonic() > deadline:
                msg = (
                    f"stream stalled: its client took no byte of its bulk connection for "
                    f"{timeout:g} s (the server's stall timeout, --stall-timeout); "
                    "resume from the last complete batch"
                )
                raise StreamStalledError(msg)

    def close(self) -> None:
        """Close the connection (the client then reads the end of its records)."""
        _hang_up(self._conn)


class BulkListener:
    """Accepts bulk connections on a TCP port of the daemon's host.

    One thread polls the port, the connections still owing their hello, and those
    greeted and waiting for their stream: a waiting connection the client closed (its
    stream was refused, or never sent) is closed at once, one no stream claimed within
    :data:`UNCLAIMED_S` after it; a hello not sent within :data:`HELLO_TIMEOUT_S` ends
    its connection.

    Parameters
    ----------
    host
        Address to bind, as for the gRPC port (``0.0.0.0``, ``::``, ``127.0.0.1``, a
        name; brackets around an IPv6 address are dropped).
    port
        Port to bind; 0 picks a free one.

    Attributes
    ----------
    port
        The bound port (``StoreInfo.bulk_port``).

    Raises
    ------
    OSError
        If the port cannot be bound.
    """

    def __init__(self, host: str, port: int = 0) -> None:
        host = host.strip("[]")
        dualstack = host == "::" and socket.has_dualstack_ipv6()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server(
            (host, port), family=family, backlog=64, dualstack_ipv6=dualstack
        )
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._closing = threading.Event()
        self._pending: dict[bytes, BulkConnection] = {}  # claimed by streams' threads
        self._greeting: dict[int, _Greeting] = {}  # the poll thread's own
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="annserve-bulk", daemon=True)
        self._thread.start()

    def claim(self, token: bytes) -> BulkConnection | None:
        """Take the connection of a token for one stream; None if this daemon holds none.

        A token this process does not hold comes from a connection that another
        replica or ``--workers`` process accepted: that stream's frames go inline.
        """
        with self._lock:
            return self._pending.pop(token, None)

    def close(self) -> None:
        """Stop accepting, and close the connections no stream claimed (safe to repeat)."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _serve(self) -> None:
        """Poll the port and the unclaimed connections until closed (the poll thread)."""
        try:
            while not self._closing.is_set():
                with self._lock:
                    waiting = {c.fileno(): (token, c) for token, c in self._pending.items()}
                greeting = dict(self._greeting)
                poller = select.poll()
                # a waiting connection turns readable when its client closes it
                for fd in [self._sock.fileno(), self._wake_r.fileno(), *greeting, *waiting]:
                    poller.register(fd, select.POLLIN)
                events = {fd for fd, _ in poller.poll(self._timeout_ms(waiting, greeting))}
                for fd in events & greeting.keys():
                    self._read_hello(greeting[fd])
                for fd in events & waiting.keys():
                    self._drop(*waiting[fd])
                if self._sock.fileno() in events:  # last: it may reuse a closed one's fd
                    self._accept()
                self._expire(time.monotonic())
        finally:
            self._shut()

    @staticmethod
    def _timeout_ms(
        waiting: dict[int, tuple[bytes, BulkConnection]], greeting: dict[int, _Greeting]
    ) -> float | None:
        """Return the ms until the next hello or claim is overdue; None if none can be."""
        deadlines = [g.deadline for g in greeting.values()]
        deadlines += [c.opened + UNCLAIMED_S for _, c in waiting.values()]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic()) * 1000 + 1

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except OSError:  # the client gave up meanwhile
            return
        with self._lock:
            full = len(self._pending) + len(self._greeting) >= MAX_PENDING
        if full:
            logger.warning("refused a bulk connection: %d wait for their streams", MAX_PENDING)
            conn.close()
            return
        conn.setblocking(False)
        self._greeting[conn.fileno()] = _Greeting(conn, time.monotonic() + HELLO_TIMEOUT_S)

    def _read_hello(self, greeting: _Greeting) -> None:
        """Take the bytes of a hello that arrived; once whole, answer it."""
        try:
            received = greeting.conn.recv(len(bulk.HELLO) - len(greeting.hello))
        except BlockingIOError:  # woken for nothing: wait on
            return
        except OSError as e:
            self._refuse(greeting, str(e))
            return
        greeting.hello += received
        if not received or not bulk.HELLO.startswith(greeting.hello):
            self._refuse(greeting, f"not a bulk hello: {greeting.hello[:32]!r}")
        elif len(greeting.hello) == len(bulk.HELLO):
            del self._greeting[greeting.conn.fileno()]
            self._answer(greeting.conn)

    def _answer(self, conn: socket.socket) -> None:
        """Hand a greeted connection its token; it waits for its stream from then on."""
        token = secrets.token_bytes(bulk.TOKEN_BYTES)
        with self._lock:  # held before the client has the token, so before it can stream
            self._pending[token] = BulkConnection(conn)
        with contextlib.suppress(OSError):  # a client gone meanwhile: its end drops it
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.send(bulk.HELLO + token)  # an empty socket buffer takes 20 bytes

    def _refuse(self, greeting: _Greeting, why: str) -> None:
        logger.warning("refused a bulk connection: %s", why)
        del self._greeting[greeting.conn.fileno()]
        _hang_up(greeting.conn)

    def _drop(self, token: bytes, connection: BulkConnection) -> None:
        """Close a waiting connection, unless a stream claimed it meanwhile."""
        with self._lock:
            if self._pending.get(token) is not connection:
                return
            del self._pending[token]
        connection.close()

    def _expire(self, now: float) -> None:
        """Close the hellos overdue and the connections no stream claimed in time."""
        for greeting in [g for g in self._greeting.values() if g.deadline < now]:
            self._refuse(greeting, f"no hello within {HELLO_TIMEOUT_S:g} s")
        with self._lock:
            old = [t for t, c in self._pending.items() if c.opened < now - UNCLAIMED_S]
            expired = [self._pending.pop(token) for token in old]
        for connection in expired:
            connection.close()

    def _shut(self) -> None:
        """Close the port and every connection no stream claimed."""
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for connection in pending:
            connection.close()
        for greeting in self._greeting.values():
            _hang_up(greeting.conn)
        self._greeting.clear()


@dataclasses.dataclass
class _Greeting:
    """A connection accepted whose hello has not all arrived."""

    conn: socket.socket
    deadline: float  # monotonic s
    hello: bytes = b""


def _hang_up(conn: socket.socket) -> None:
    """Shut a connection down both ways and close it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
