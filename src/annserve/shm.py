"""The same-host shared-memory transport's side channel, shared by daemon and client.

A daemon listening on a unix socket also listens on a ``SOCK_SEQPACKET`` socket at
the same path + ``".shm"``. A client connects it and sends :func:`hello`; the daemon
answers with a session token and one memfd per slot (``SCM_RIGHTS``). Frames of a
stream naming the token are written into the slots, each write numbered; the client
sends the write's number back (:func:`release`) when it no longer reads it. Frames shared
by identical streams lie in memfds of their own, each sent once per stream with
:func:`announce` before the first frame in it. The memory belongs to no
file: the kernel frees it once both processes have closed the descriptors, so a
process that dies leaves nothing behind. See the wire contract in ``annserve.proto``.
"""

from __future__ import annotations

import struct

#: First bytes of the hello and of the daemon's answer.
MAGIC = b"ASM1"
#: First bytes of the daemon's announcement of a shared frame's memfd.
SHARED = b"ASF1"
#: First bytes of the daemon's answer when it refuses a session.
REFUSED = b"ERR "
#: Bytes of a session token.
TOKEN_BYTES = 16
#: Most slots one session may hold.
MAX_SLOTS = 16
#: Suffix of the side socket's path after the gRPC socket's.
SUFFIX = ".shm"

_HELLO = struct.Struct("<4sI")
_SEQ = struct.Struct("<Q")
_ANNOUNCE = struct.Struct("<4sQ")
#: Size of the largest message either side reads.
MAX_MESSAGE = 4096


def side_socket(address: str) -> str | None:
    """Return the side socket's path of a gRPC address, None if it is not a unix socket path.

    Parameters
    ----------
    address
        gRPC target: ``unix:/abs/path``, ``unix:///abs/path`` or ``unix:rel/path``
        name a path; ``unix-abstract:`` names and TCP addresses have no side socket.
    """
    if not address.startswith("unix:"):
        return None
    path = address.removeprefix("unix:")
    if path.startswith("//"):
        path = path[2:]
    return path + SUFFIX if path else None


def hello(n_slots: int) -> bytes:
    """Return the client's first message, asking for ``n_slots`` slots."""
    return _HELLO.pack(MAGIC, n_slots)


def parse_hello(message: bytes) -> int:
    """Return the slots a hello asks for.

    Raises
    ------
    ValueError
        If the message is not a hello, or asks for no slots or more than :data:`MAX_SLOTS`.
    """
    if len(message) != _HELLO.size:
        msg = f"not a shared-memory hello: {len(message)} bytes, expected {_HELLO.size}"
        raise ValueError(msg)
    magic, n_slots = _HELLO.unpack(message)
    if magic != MAGIC:
        msg = f"not a shared-memory hello: starts with {magic!r}, expected {MAGIC!r}"
        raise ValueError(msg)
    if not 1 <= n_slots <= MAX_SLOTS:
        msg = f"n_slots must be in 1..{MAX_SLOTS}, got {n_slots}"
        raise ValueError(msg)
    return n_slots


def release(seq: int) -> bytes:
    """Return the message handing the slot of write ``seq`` back to the daemon."""
    return _SEQ.pack(seq)


def parse_releases(message: bytes) -> list[int]:
    """Return the writes a client's message hands back (one or more packed numbers).

    Raises
    ------
    ValueError
        If the message length is not a multiple of 8 bytes.
    """
    if not message or len(message) % _SEQ.size:
        msg = f"not a slot release: {len(message)} bytes"
        raise ValueError(msg)
    return [s for (s,) in _SEQ.iter_unpack(message)]


def announce(memfd_id: int) -> bytes:
    """Return the daemon's message sent with a shared frame's memfd (its descriptor attached)."""
    return _ANNOUNCE.pack(SHARED, memfd_id)


def parse_announce(message: bytes) -> int:
    """Return the id of the shared memfd a daemon's message announces.

    Raises
    ------
    ValueError
        If the message is not an announcement.
    """
    if len(message) != _ANNOUNCE.size or not message.startswith(SHARED):
        msg = f"not a shared-frame announcement: {message[:16]!r} ({len(message)} bytes)"
        raise ValueError(msg)
    return _ANNOUNCE.unpack(message)[1]
