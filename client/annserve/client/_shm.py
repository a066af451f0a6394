"""The client's side of the same-host shared-memory transport (see :mod:`annserve.shm`).

A :class:`SharedMemorySession` holds the memfd slots the daemon handed over, mapped
once and reused from batch to batch (and epoch to epoch). Each frame that arrives
in a slot is handed on as a writable memoryview whose exporter releases the slot
when the last array viewing it is gone, i.e. when the training loop drops the batch
built from it. So that a loop keeping batches (``list(loader)``) cannot starve the
daemon, a frame arriving while all other slots are held is copied out and its slot
released at once. Frames that the daemon shares among identical streams arrive in
memfds of their own, announced on the side socket: each is mapped once per stream and
its descriptor closed at once (such a memfd never grows).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import select
import socket
import threading
import weakref
from functools import cache
from typing import TYPE_CHECKING

from annserve import shm
from annserve.errors import FrameDecodeError, ServerUnavailableError
from annserve.wire import pointer_header

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from annserve.v1 import annserve_pb2 as pb

logger = logging.getLogger(__name__)


@cache
def _exporter(nbytes: int) -> type[ctypes.Array[ctypes.c_char]]:
    """Return a ctypes array type of ``nbytes``: instances export a mapping, take weakrefs."""
    return type(f"Slot{nbytes}", (ctypes.c_char * nbytes,), {})


def released_view(
    buffer: mmap.mmap | bytearray, nbytes: int, release: Callable[[], None]
) -> memoryview:
    """Return bytes ``[0, nbytes)`` of ``buffer``, calling ``release()`` once no view is left.

    The view's exporter is a ctypes array over ``buffer``; arrays built from the view
    (numpy, torch) keep it alive, so ``release`` runs when the last of them is gone.
    """
    view = _exporter(len(buffer)).from_buffer(buffer)
    weakref.finalize(view, release)
    return memoryview(view).cast("B")[:nbytes]


class SharedMemorySession:
    """A session on a daemon's side socket: slots to receive frames in.

    Parameters
    ----------
    path
        The side socket's path (:func:`annserve.shm.side_socket`).
    n_slots
        Slots to ask for, 1 to :data:`annserve.shm.MAX_SLOTS`.
    timeout
        Seconds to wait for the daemon's answer.

    Raises
    ------
    ServerUnavailableError
        If nothing listens at ``path``, or the daemon refuses the session.
    """

    def __init__(self, path: str, n_slots: int, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.send(shm.hello(n_slots))
            message, fds, _, _ = socket.recv_fds(sock, shm.MAX_MESSAGE, n_slots)
        except OSError as e:
            sock.close()
            msg = f"no shared-memory session at {path}: {e}"
            raise ServerUnavailableError(msg) from e
        if not message.startswith(shm.MAGIC) or len(fds) != n_slots:
            for fd in fds:
                os.close(fd)
            sock.close()
            reason = message.removeprefix(shm.REFUSED).decode(errors="replace")[:200]
            msg = f"the daemon at {path} refused a shared-memory session: {reason}"
            raise ServerUnavailableError(msg)
        sock.settimeout(None)
        self.path = path
        self.token = message[len(shm.MAGIC) :]
        self._sock = sock
        self._fds = fds
        self._maps: list[mmap.mmap | None] = [None] * n_slots
        self._shared: dict[int, mmap.mmap] = {}  # this stream's shared memfds, by id
        self._timeout = timeout
        self._held: set[int] = set()  # writes (shm_seq) handed on as views, not released
        self._lock = threading.Lock()
        self.busy = False  # a stream uses it
        # closed with the session, or when it is garbage collected (its loader dropped)
        self._closer = weakref.finalize(self, _close, sock, list(fds))

    @property
    def n_slots(self) -> int:
        """Slots of the session."""
        return len(self._fds)

    def apply(self, request: pb.StreamBatchesRequest) -> None:
        """Name this session, the writes it still holds and shared frames in a request."""
        request.shm_session = self.token
        request.shm_held[:] = self.held()
        request.shm_shared_frames = True

    def alive(self) -> bool:
        """Return whether the daemon still holds the session (its socket is open)."""
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def frames(self, messages: Iterator[bytes]) -> Iterator[bytes | bytearray | memoryview]:
        """Turn a shared-memory stream's messages into the frames they point to.

        Raises
        ------
        FrameDecodeError
            If a message does not parse or names a slot or size the session lacks, or a
            shared memfd the daemon does not announce within the session's timeout.
        """
        self._shared.clear()  # the daemon announces each stream's shared memfds anew
        for message in messages:
            header = pointer_header(message, "shared-memory")
            if not header.shm_nbytes:
                yield message
                continue
            if header.shm_shared:
                mapping = self._shared_mapping(header.shm_shared, header.shm_nbytes)
            else:
                mapping = self._mapping(header.shm_slot, header.shm_nbytes)
            yield self._frame(mapping, header.shm_nbytes, header.shm_seq)

    def held(self) -> list[int]:
        """Return the writes (``shm_seq``) whose slots batches still view."""
        with self._lock:
            return sorted(self._held)

    def _frame(self, mapping: mmap.mmap, nbytes: int, seq: int) -> bytearray | memoryview:
        """Return bytes ``[0, nbytes)`` of a write: a view that releases it, or a copy."""
        with self._lock:
            copy = len(self._held) >= self.n_slots - 1
            if not copy:
                self._held.add(seq)
        if copy:  # the daemon must keep a slot to write into
            out = bytearray(memoryview(mapping)[:nbytes])
            self._send_release(seq)
            return out
        return released_view(mapping, nbytes, lambda: self._release(seq))

    def _mapping(self, slot: int, nbytes: int) -> mmap.mmap:
        if not 0 <= slot < self.n_slots or nbytes < 0:
            msg = f"shared-memory frame names slot {slot} ({nbytes} bytes) of {self.n_slots}"
            raise FrameDecodeError(msg)
        mapping = self._maps[slot]
        if mapping is None or len(mapping) < nbytes:  # the daemon grew the slot
            size = os.fstat(self._fds[slot]).st_size
            if size < nbytes:
                msg = f"shared-memory slot {slot} holds {size} bytes, the frame {nbytes}"
                raise FrameDecodeError(msg)
            mapping = mmap.mmap(self._fds[slot], size)  # views of an older mapping keep it
            self._maps[slot] = mapping
        return mapping

    def _shared_mapping(self, memfd_id: int, nbytes: int) -> mmap.mmap:
        """Return the mapping of a shared memfd, taking announcements until it comes."""
        while memfd_id not in self._shared:
            self._take_announcement()
        mapping = self._shared[memfd_id]
        if nbytes < 0 or len(mapping) < nbytes:
            msg = f"shared-memory frame of {nbytes} bytes in memfd {memfd_id} of {len(mapping)}"
            raise FrameDecodeError(msg)
        return mapping

    def _take_announcement(self) -> None:
        """Map the shared memfd of the daemon's next announcement on the side socket."""
        if not select.select([self._sock], [], [], self._timeout)[0]:
            msg = f"the daemon announced no shared memfd within {self._timeout:g} s"
            raise FrameDecodeError(msg)
        try:
            message, fds, _, _ = socket.recv_fds(self._sock, shm.MAX_MESSAGE, 1)
        except OSError as e:
            msg = f"shared-memory side socket failed: {e}"
            raise FrameDecodeError(msg) from e
        try:
            memfd_id = shm.parse_announce(message)
            if len(fds) != 1:
                msg = f"shared-frame announcement carries {len(fds)} descriptors, expected 1"
                raise ValueError(msg)
            self._shared[memfd_id] = mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
        except (OSError, ValueError) as e:
            raise FrameDecodeError(str(e)) from e
        finally:
            for fd in fds:
                os.close(fd)

    def _release(self, seq: int) -> None:
        # under the lock: a request's held() lists a write, or its release was sent before
        with self._lock:
            self._held.discard(seq)
            self._send_release(seq)

    def _send_release(self, seq: int) -> None:
        with contextlib.suppress(OSError):  # the daemon is gone: nothing to give back
            self._sock.send(shm.release(seq))

    def close(self) -> None:
        """Close the session; memory still viewed by batches stays valid until they go."""
        self._closer()
        self._fds = []
        self._maps = []
        self._shared = {}


def _close(sock: socket.socket, fds: list[int]) -> None:
    sock.close()
    for fd in fds:
        os.close(fd)
