"""CPU of the same-host row gather into a memfd: ``pwritev`` against the alternatives.

A shared-memory frame is a preload buffer's rows gathered into a memfd slot
(``server/rpc/gather.py``): ~8k pieces per buffer. This times, for the same pieces
(a buffer cut into ``--pieces`` rows of 1-4 KB, in shuffled order), in this process,
CPU seconds per buffer (medians of ``--reps``):

* the gather alone, from the buffer in memory:
  ``pwritev`` (the daemon's own ``pwrite_parts``: iovecs built with numpy, libc ``pwritev``),
  ``process_vm_writev`` into the memfd mapped here, ``np.concatenate`` of one view per
  piece into that mapping;
* the buffer's whole trip from a file in the page cache: ``preadv + pwritev`` (the
  daemon's read of its chunk ranges into the buffer, then the gather) against
  ``pwritev from mmap`` (the gather straight from the file's mapping, ``MAP_POPULATE``,
  unmapped after: one copy instead of two).

Every way must leave the same bytes in the memfd (checked).

    python benchmarks/bench_gather.py --reps 5
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import mmap
import os
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np

from annserve.server.rpc.gather import iovecs, pwrite_parts
from annserve.wire import IOV_MAX, Pieces

if TYPE_CHECKING:
    from collections.abc import Callable


def _libc(name: str, *argtypes: object) -> Callable[..., int]:
    function = getattr(ctypes.CDLL(None, use_errno=True), name)
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_ssize_t
    return function


class Gather:
    """One preload buffer's rows, shuffled, a file holding the buffer, and a memfd slot."""

    def __init__(self, pieces: int, directory: str, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(1000, 4000, size=pieces)
        self.total = int(self.lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        order = rng.permutation(pieces)
        self.starts, self.lengths = offsets[order], self.lengths[order]
        self.source = rng.integers(0, 255, size=self.total, dtype=np.uint8)
        fd, self.path = tempfile.mkstemp(dir=directory, prefix="bench-gather-")
        with os.fdopen(fd, "wb") as f:
            f.write(self.source.tobytes())  # now in the page cache
        self.fd = os.memfd_create("bench-gather")
        os.ftruncate(self.fd, self.total)
        self.mapping = mmap.mmap(self.fd, self.total)
        self.target = np.frombuffer(self.mapping, np.uint8)
        self.target[:] = 0  # every page backed before timing
        self.buffer = np.zeros(self.total, np.uint8)  # a pooled preload buffer, reused
        self._pvw = _libc(
            "process_vm_writev",
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
        )

    def close(self) -> None:
        os.unlink(self.path)

    def _rows(self, values: np.ndarray) -> Pieces:
        return Pieces(values, self.starts, self.starts + self.lengths, self.total)

    def _gather(self, values: np.ndarray) -> None:
        """The daemon's own gather (``pwrite_parts``) of the rows of ``values``."""
        assert pwrite_parts(self.fd, [self._rows(values)], 0) == self.total

    def pwritev(self) -> None:
        self._gather(self.source)

    def process_vm_writev(self) -> None:
        iov, _ = iovecs([self._rows(self.source)])  # the daemon's iovecs; source stays alive
        offset, pid = 0, os.getpid()
        for i in range(0, len(iov), IOV_MAX):
            block = iov[i : i + IOV_MAX]
            size = int(block[:, 1].sum())
            remote = np.array([[self.target.ctypes.data + offset, size]], np.uint64)
            n = self._pvw(pid, block.ctypes.data, len(block), remote.ctypes.data, 1, 0)
            assert n == size, ctypes.get_errno()
            offset += n

    def concatenate(self) -> None:
        views = [
            self.source[start : start + length]
            for start, length in zip(self.starts.tolist(), self.lengths.tolist(), strict=True)
        ]
        np.concatenate(views, out=self.target)

    def preadv_pwritev(self) -> None:
        bounds = np.linspace(0, self.total, CHUNK_READS + 1).astype(int).tolist()
        with open(self.path, "rb", buffering=0) as f:
            for lo, hi in itertools.pairwise(bounds):  # one range per sampler chunk
                view = memoryview(self.buffer[lo:hi])
                assert os.preadv(f.fileno(), [view], lo) == hi - lo
        self._gather(self.buffer)

    def pwritev_from_mmap(self) -> None:
        with open(self.path, "rb", buffering=0) as f:
            mapped = mmap.mmap(f.fileno(), self.total, prot=mmap.PROT_READ, flags=_POPULATE)
        try:
            self._gather(np.frombuffer(mapped, np.uint8))
        finally:
            mapped.close()


#: Contiguous ranges one preload buffer is read in (its sampler chunks).
CHUNK_READS = 256
_POPULATE = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=8192, help="rows per preload buffer")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--dir", default="/var/tmp", help="where the buffer's file goes")
    args = parser.parse_args(argv)
    gather = Gather(args.pieces, args.dir)
    ways = {
        "gather: pwritev": gather.pwritev,
        "gather: process_vm_writev": gather.process_vm_writev,
        "gather: np.concatenate": gather.concatenate,
        "file to memfd: preadv + pwritev": gather.preadv_pwritev,
        "file to memfd: pwritev from mmap": gather.pwritev_from_mmap,
    }
    expected = None
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.reps):
            for name, way in ways.items():
                gather.target[:] = 0
                start = time.process_time()
                way()
                seconds[name].append(time.process_time() - start)
                got = gather.target.tobytes()
                expected = expected or got
                assert got == expected, f"{name} gathered other bytes"
    finally:
        gather.close()
    mb = gather.total / 1e6
    print(
        f"{args.pieces} rows ({mb:.1f} MB) in shuffled order into a memfd, the file in "
        f"{args.dir}, medians of {args.reps} interleaved repetitions"
    )
    print("| way | CPU ms | GB/s |")
    print("|---|--:|--:|")
    for name, runs in seconds.items():
        cpu = statistics.median(runs)
        print(f"| {name} | {cpu * 1e3:.2f} | {mb / cpu / 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
