"""Keep freed message-sized memory in the process instead of returning it to the OS.

Every frame is a fresh ``bytes`` object of a few MB on both ends of the stream
(gRPC hands messages over as new ``bytes``). glibc's malloc serves such blocks
with ``mmap`` or trims them off the heap when freed, so each new frame is
page-faulted and zeroed by the kernel again: measured on a 2-core machine, page
faults were a third of the daemon's CPU and about half of the client's.
Raising glibc's mmap and trim thresholds (``mallopt(M_MMAP_THRESHOLD)``,
``mallopt(M_TRIM_THRESHOLD)``, the same knobs as the ``MALLOC_MMAP_THRESHOLD_``
and ``MALLOC_TRIM_THRESHOLD_`` environment variables) lets the heap reuse those
blocks; the process keeps up to :data:`TRIM_THRESHOLD` bytes of freed memory.

Threads are the other source: glibc gives each thread that allocates its own
arena of heaps of at most 64 MiB, and unmaps a heap once it is empty, so frames
received or built on a stream thread kept being faulted in again (the client
took 2k-74k faults per epoch, ~0.2 CPU-s at worst). One arena for the whole process
(``mallopt(M_ARENA_MAX, 1)``, as ``MALLOC_ARENA_MAX=1``) ends that: measured
steady-state client faults fell below 1k per epoch and peak RSS by ~130 MiB.

numpy is the third: it marks arrays of 4 MiB and more ``madvise(MADV_HUGEPAGE)``, so
the first touch of such an array faults in whole 2 MiB pages, which on the development
VM ran ~17x slower than small pages (the kernel counted no compaction stalls: the cost
is in backing the huge pages, likely by the VM's host). :func:`avoid_huge_pages` turns
that off for the process; :func:`small_pages` for one array (the client's pooled batch
buffers, leaving the training process's other arrays as numpy makes them).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from functools import cache

import numpy as np

from annserve import libc

logger = logging.getLogger(__name__)

#: glibc ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Blocks up to this size come from the heap, bytes (glibc's upper limit on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Freed memory at the top of a heap kept for reuse, bytes; :func:`trim_freed_memory`
#: bounds the freed memory below the top with it too.
TRIM_THRESHOLD = 512 << 20


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (``<malloc.h>``, glibc >= 2.33); sizes in bytes."""

    _fields_ = [
        (field, ctypes.c_size_t)
        for field in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",  # free bytes in the heaps, wherever they lie
            "keepcost",
        )
    ]


@cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks of up to 32 MiB in one arena; once per process.

    Threads started before the call may keep arenas of their own.

    Returns
    -------
    Whether the thresholds were set: False where the C library is not glibc
    (musl, macOS), which is then left as it is.
    """
    mallopt = libc.function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_ARENA_MAX, 1),
    )
    ok = all([mallopt(param, value) for param, value in settings])
    logger.debug("malloc thresholds and arena count set: %s", ok)
    return ok


@cache
def avoid_huge_pages() -> bool:
    """Keep numpy from asking for transparent huge pages for large arrays; once per process.

    The first touch of memory numpy marked ``MADV_HUGEPAGE`` faults in a whole 2 MiB
    page (THP ``enabled`` and ``defrag`` are ``madvise`` there). Measured on the 2-core
    development VM, a fresh process first touched a 300 MB array at 107-113 MB/s with
    huge pages and at 1.9-2.0 GB/s without; the daemon's first epoch on annbatch's LZ4
    collection, which fills the decoded-chunk cache, cost it 27-74 against 31-39
    µs/cell, and on the uncompressed collection 15-34 against 12-13. The same switch
    as numpy's ``NUMPY_MADVISE_HUGEPAGE=0``; when that variable is set, numpy's own
    reading of it stands.

    Returns
    -------
    Whether numpy's setting was changed: False when ``NUMPY_MADVISE_HUGEPAGE`` is set
    or this numpy has no such switch.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)  # numpy >= 2
    setter = getattr(multiarray, "_set_madvise_hugepage", None)  # numpy's own switch
    if setter is None:
        logger.debug("numpy has no _set_madvise_hugepage; its huge-page use left as it is")
        return False
    setter(False)
    return True


def small_pages(array: np.ndarray) -> bool:
    """Have the kernel back a not yet touched array with small pages (``MADV_NOHUGEPAGE``).

    For buffers written once and then reused (:class:`annserve.buffers.BufferPool`): their
    first touch costs what :func:`avoid_huge_pages` describes, in the first batches of a
    loader. The advice covers the whole pages inside the array; other arrays keep
    numpy's setting.

    Parameters
    ----------
    array
        Any array; advice given to memory already touched changes nothing measurable.

    Returns
    -------
    Whether the kernel took the advice: False off Linux, without libc's ``madvise``, or
    for an array that spans no whole page.
    """
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)  # Linux only
    madvise = libc.function("madvise") if advice is not None else None
    if madvise is None:
        return False
    start = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop <= start:
        return False
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise(start, stop - start, advice) == 0


def freed_heap_bytes() -> int | None:
    """Return the bytes malloc holds freed in its heaps, or None without glibc >= 2.33."""
    mallinfo2 = libc.function("mallinfo2")
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().fordblks)


def trim_freed_memory(keep: int = 0) -> bool:
    """Give malloc's freed memory back to the OS once it holds more than ``keep`` bytes.

    glibc trims only the top of a heap (:data:`TRIM_THRESHOLD`): memory freed below a
    block still in use stays resident however much of it there is, so a daemon kept
    the peak of its past streams (3.17 GB after 64 streams had ended).
    ``malloc_trim(0)`` returns every free page wherever it lies; later allocations
    page-fault them in again.

    Parameters
    ----------
    keep
        Freed bytes left alone (:func:`freed_heap_bytes`); 0 trims whatever is free.

    Returns
    -------
    Whether memory was trimmed: False at or below ``keep``, and where the C library
    is not glibc (with ``keep`` > 0: glibc < 2.33).
    """
    malloc_trim = libc.function("malloc_trim")
    if malloc_trim is None or keep and (freed_heap_bytes() or 0) <= keep:
        return False
    malloc_trim(0)
    return True
