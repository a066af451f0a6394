"""The bulk channel of remote streams, shared by daemon and client.

Python gRPC copies each received message at least twice after the kernel (a
``bytes`` per slice, then the joined message): ~7.5 us per cell of a compact frame,
as much as the rest of a trainer's work. A daemon without TLS therefore also listens
on a plain TCP port (``StoreInfo.bulk_port``). A client connects it, sends
:data:`HELLO` and reads the session token back; a stream naming the token gets each
frame on that connection as one record (:func:`record_prefix`, then the serialized
frame), written by the daemon with one gathering ``writev`` and read by the client
with ``recv_into`` a reused buffer, while gRPC carries only headers and the status.
See the wire contract in ``annserve.proto``.
"""

from __future__ import annotations

import struct

#: The client's hello, and the first bytes of the daemon's answer.
HELLO = b"ABK1"
#: Bytes of a session token.
TOKEN_BYTES = 16
#: Bytes of the daemon's answer to the hello: :data:`HELLO` + the token.
ANSWER_BYTES = len(HELLO) + TOKEN_BYTES
#: Largest record a client accepts (bytes): more means a broken stream.
MAX_RECORD_BYTES = 1 << 31

_PREFIX = struct.Struct("<Q")
#: Bytes of a record's prefix.
PREFIX_BYTES = _PREFIX.size


def record_prefix(nbytes: int) -> bytes:
    """Return the prefix of a record holding a frame of ``nbytes`` bytes."""
    return _PREFIX.pack(nbytes)


def parse_prefix(prefix: bytes | bytearray | memoryview) -> int:
    """Return the frame bytes a record's prefix announces.

    Raises
    ------
    ValueError
        If it is over :data:`MAX_RECORD_BYTES`.
    """
    (nbytes,) = _PREFIX.unpack(prefix)
    if nbytes > MAX_RECORD_BYTES:
        msg = f"bulk record of {nbytes} bytes announced, at most {MAX_RECORD_BYTES} accepted"
        raise ValueError(msg)
    return nbytes


def parse_answer(answer: bytes) -> bytes:
    """Return the session token of the daemon's answer to the hello.

    Raises
    ------
    ValueError
        If it is not :data:`HELLO` + a token.
    """
    if len(answer) != ANSWER_BYTES or not answer.startswith(HELLO):
        msg = f"not a bulk channel's answer: {answer[:32]!r}"
        raise ValueError(msg)
    return answer[len(HELLO) :]
