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

    def pack(
        self,
        header: pb.BatchHeader,
        arrays: Sequence[tuple[str, FrameArray]],
        timeout: float,
        cancelled: threading.Event,
    ) -> bytes:
        """Send a frame as the connection's next record; return the gRPC message pointing to it.

        Parameters
        ----------
        header, arrays
            The frame, as for :func:`annserve.wire.encode_frame` (``header`` is filled).
        timeout
            Seconds the client may take no byte before the stream is stalled.
        cancelled
            Set when the stream is over; a wait for the client then ends.

        Raises
        ------
        StreamStalledError
            If the client takes no byte for ``timeout`` seconds.
        ServerUnavailableError
            If the client closed the connection, or the stream was cancelled, meanwhile.
        DataLossError
            If a mapped store file shrank under the frame's rows.
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
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        self._conn.close()


class BulkListener:
    """Accepts bulk connections on a TCP port of the daemon's host.

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
        self.port: int = self._sock.getsockname()[1]
        self._pending: dict[bytes, BulkConnection] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="annserve-bulk", daemon=True)
        self._thread.start()

    def claim(self, token: bytes) -> BulkConnection | None:
        """Take the connection of a token for one stream; None if this daemon holds none.

        A token this process does not hold comes from a connection that another
        replica or ``--workers`` process accepted: that stream's frames go inline.
        """
        with self._lock:
            return self._pending.pop(token, None)

    def close(self) -> None:
        """Stop accepting, and close the connections no stream claimed."""
        self._sock.close()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for connection in pending:
            connection.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            threading.Thread(
                target=self._greet, args=(conn,), name="annserve-bulk-hello", daemon=True
            ).start()

    def _greet(self, conn: socket.socket) -> None:
        """Read the hello, answer with a token and keep the connection until claimed."""
        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            hello = conn.recv(len(bulk.HELLO), socket.MSG_WAITALL)
            if hello != bulk.HELLO:
                msg = f"not a bulk hello: {hello[:32]!r}"
                raise ValueError(msg)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, ValueError) as e:
            logger.warning("refused a bulk connection: %s", e)
            conn.close()
            return
        token = secrets.token_bytes(bulk.TOKEN_BYTES)
        answer = bulk.HELLO + token
        connection = BulkConnection(conn)  # non-blocking from here on
        with self._lock:  # held before the client has the token, so before it can stream
            expired = self._expired(time.monotonic() - UNCLAIMED_S)
            full = len(self._pending) >= MAX_PENDING
            if not full:
                self._pending[token] = connection
        for old in expired:
            old.close()
        if full:
            logger.warning("refused a bulk connection: %d wait for their streams", MAX_PENDING)
            connection.close()
            return
        if conn.send(answer) != len(answer):  # an empty socket buffer takes 20 bytes
            with self._lock:
                self._pending.pop(token, None)
            connection.close()

    def _expired(self, before: float) -> list[BulkConnection]:
        """Drop the connections opened before ``before`` (monotonic s) and no stream claimed."""
        old = [token for token, c in self._pending.items() if c.opened < before]
        return [self._pending.pop(token) for token in old]
