"""The client's side of the bulk channel of remote streams (see :mod:`annserve.bulk`).

A :class:`BulkConnection` serves one stream: a reader thread takes each record off
the socket with ``recv_into`` a buffer of the loader's pool, at most ``depth`` records
ahead of the loop, so a full queue stops reading and TCP's window holds the daemon
back. Each gRPC message then names its record's size, and the record is handed on as a
view of that buffer, which the pool reuses once the batch built from it is dropped
(from epoch to epoch: a stream's connection is new, its buffers are not). The reader
must run ahead: the daemon writes a record before the message that points to it, and
a whole-batch record is larger than the socket's buffers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue
import socket
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np

from annserve import bulk
from annserve.client._rpc import several_replicas
from annserve.errors import FrameDecodeError, ServerUnavailableError
from annserve.wire import pointer_header

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annserve.buffers import BufferPool
    from annserve.v1 import annserve_pb2 as pb

logger = logging.getLogger(__name__)

#: Most seconds to connect and be greeted: a port a firewall drops must not hold the
#: first batch for long (the stream then goes over gRPC).
CONNECT_TIMEOUT_S = 2.0
#: Seconds between the reader's checks that its connection was closed, queue full.
_POLL_S = 0.1
#: Seconds :meth:`BulkConnection.close` waits for the reader thread to end.
_CLOSE_TIMEOUT_S = 5.0


def bulk_host(target: str) -> str | None:
    """Return the host to reach a daemon's bulk port at, None where there is none to reach.

    Parameters
    ----------
    target
        The loader's gRPC target: ``host:port``, ``[v6]:port`` and a single
        ``ipv4:``/``ipv6:`` address name one server; ``unix:`` sockets (shared memory's
        domain) and targets of several replicas (the described port may be another's)
        have none.
    """
    if target.startswith("unix") or several_replicas(target):
        return None
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        target = rest
    host, _, port = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit():
        return None
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return host


class BulkConnection:
    """A connection to a daemon's bulk channel, for one stream.

    Parameters
    ----------
    host, port
        The daemon's host (:func:`bulk_host`) and bulk port (``StoreInfo.bulk_port``).
    timeout
        Seconds to wait for a record once the message pointing to it arrived; to
        connect and be greeted, at most :data:`CONNECT_TIMEOUT_S` of them.
    depth
        Records read ahead of the loop, at most.
    pool
        Where the records' buffers come from (the loader's, kept across epochs).

    Raises
    ------
    ServerUnavailableError
        If the port cannot be reached, or does not answer as a bulk channel.
    """

    def __init__(self, host: str, port: int, timeout: float, depth: int, pool: BufferPool) -> None:
        try:
            sock = socket.create_connection((host, port), min(timeout, CONNECT_TIMEOUT_S))
        except OSError as e:
            msg = f"no bulk channel at {host}:{port}: {e}"
            raise ServerUnavailableError(msg) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(bulk.HELLO)
            self.token = bulk.parse_answer(_receive(sock, bulk.ANSWER_BYTES))
            sock.settimeout(None)
        except (OSError, ValueError) as e:
            sock.close()
            msg = f"the bulk channel at {host}:{port} did not greet: {e}"
            raise ServerUnavailableError(msg) from e
        self._sock = sock
        self._timeout = timeout
        self._records: queue.Queue[memoryview | BaseException | None] = queue.Queue(depth)
        self._pool = pool
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="annserve-bulk", daemon=True)
        self._reader.start()

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Name this connection in a stream's request."""
        request.bulk_session = self.token

    def frames(self, messages: Iterator[bytes]) -> Iterator[bytes | memoryview]:
        """Turn a stream's messages into its frames: inline ones, or their records.

        Raises
        ------
        FrameDecodeError
            If a message does not parse, or its record differs in size or does not
            come within the timeout.
        ServerUnavailableError
            If the connection failed or ended before a record its message points to.
        """
        for message in messages:
            header = pointer_header(message, "bulk")
            if not header.bulk_nbytes:  # inline: the daemon holds no such connection
                yield message
                continue
            record = self._next_record()
            if len(record) != header.bulk_nbytes:
                msg = f"bulk record of {len(record)} bytes, its header says {header.bulk_nbytes}"
                raise FrameDecodeError(msg)
            yield record

    def close(self) -> None:
        """Close the connection; records still viewed by batches stay valid."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        # shutdown woke its recv; a full queue is polled. Not while the interpreter
        # finalizes (a loop's generator closed as its module is cleared): daemon threads
        # run no more then, so the join could only wait out its timeout
        if not sys.is_finalizing():
            self._reader.join(_CLOSE_TIMEOUT_S)
        self._sock.close()

    def _next_record(self) -> memoryview:
        try:
            record = self._records.get(timeout=self._timeout)
        except queue.Empty:
            msg = f"no bulk record within {self._timeout:g} s of the message pointing to it"
            raise FrameDecodeError(msg) from None
        if isinstance(record, memoryview):
            return record
        msg = "the bulk connection ended before the stream's last record"
        if record is not None:
            msg = f"the bulk connection failed: {record}"
        raise ServerUnavailableError(msg) from record

    def _read(self) -> None:
        """Take records off the socket until it ends (the reader thread)."""
        prefix = bytearray(bulk.PREFIX_BYTES)
        try:
            while _receive_into(self._sock, memoryview(prefix), eof_ok=True):
                buffer = self._pool.empty((bulk.parse_prefix(prefix),), np.uint8)
                record = memoryview(buffer.data)
                _receive_into(self._sock, record)
                self._hand_on(record)
            self._hand_on(None)
        except (OSError, ValueError) as e:
            self._hand_on(None if self._closed.is_set() else e)

    def _hand_on(self, record: memoryview | BaseException | None) -> None:
        """Queue a record (or the end), waiting for room unless the connection is closed."""
        while not self._closed.is_set():
            try:
                self._records.put(record, timeout=_POLL_S)
                return
            except queue.Full:
                continue


def _receive(sock: socket.socket, nbytes: int) -> bytes:
    """Return exactly ``nbytes`` from ``sock``.

    Raises
    ------
    ConnectionError
        If the connection ends within them.
    """
    buffer = bytearray(nbytes)
    _receive_into(sock, memoryview(buffer))
    return bytes(buffer)


def _receive_into(sock: socket.socket, view: memoryview, *, eof_ok: bool = False) -> bool:
    """Fill ``view`` from ``sock``; return False at a clean end before it when ``eof_ok``.

    Raises
    ------
    ConnectionError
        If the connection ends within ``view`` (or before it, without ``eof_ok``).
    """
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)  # one wakeup, not one a packet
        if n == 0:
            if eof_ok and got == 0:
                return False
            msg = f"the connection ended after {got} of {len(view)} bytes"
            raise ConnectionError(msg)
        got += n
    return True
