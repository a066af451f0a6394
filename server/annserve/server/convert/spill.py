"""Bucket spill files of the external shuffle in ``annserve convert``.

Pass 1 appends each block's rows of bucket ``b`` to ``bucket_<b>.bin`` as one record:
a header of int64 element counts, one per array of :meth:`RowBlock.arrays`, then the
arrays' raw bytes. Pass 2 reads a bucket back into arrays allocated once at their final
size (a first scan sums the headers), so a bucket is held once, not twice.
"""

from __future__ import annotations

import logging
import resource
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from annserve.server.convert.rows import RowBlock, from_arrays

if TYPE_CHECKING:
    from pathlib import Path

logger = logging.getLogger(__name__)


def _max_open_files() -> int:
    """Spill files kept open at once: half the soft limit on open files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 256 if soft == resource.RLIM_INFINITY else max(16, soft // 2)


class SpillWriter:
    """Appends row blocks to per-bucket files in ``directory`` (created, must not exist).

    Every block must have the layout and dtypes of ``template``.

    Attributes
    ----------
    rows
        Rows written to each bucket, shape ``(n_buckets,)``, int64.
    bytes
        Bytes written to each bucket, shape ``(n_buckets,)``, int64.
    """

    def __init__(self, directory: Path, n_buckets: int, template: RowBlock) -> None:
        self._dtypes = [a.dtype for a in template.arrays()]
        directory.mkdir()
        self.paths = [directory / f"bucket_{b:05d}.bin" for b in range(n_buckets)]
        self._files: list[BinaryIO] | None = None
        if n_buckets <= _max_open_files():
            self._files = [p.open("wb") for p in self.paths]
        self.rows = np.zeros(n_buckets, dtype=np.int64)
        self.bytes = np.zeros(n_buckets, dtype=np.int64)

    def append(self, bucket: int, block: RowBlock) -> None:
        """Append a block's rows to a bucket's file."""
        arrays = block.arrays()
        if [a.dtype for a in arrays] != self._dtypes:  # the reader trusts the layout
            msg = f"block layout {[a.dtype for a in arrays]} differs from {self._dtypes}"
            raise TypeError(msg)
        header = np.array([a.size for a in arrays], dtype=np.int64)
        if self._files is not None:
            self._write(self._files[bucket], header, arrays)
        else:  # more buckets than open files allowed: open per record
            with self.paths[bucket].open("ab") as f:
                self._write(f, header, arrays)
        self.rows[bucket] += block.n_rows
        self.bytes[bucket] += header.nbytes + sum(a.nbytes for a in arrays)

    @staticmethod
    def _write(f: BinaryIO, header: np.ndarray, arrays: list[np.ndarray]) -> None:
        f.write(header.tobytes())
        for a in arrays:
            f.write(np.ascontiguousarray(a).data)

    def close(self) -> None:
        """Flush and close every file."""
        for f in self._files or ():
            f.close()
        self._files = None


def read_bucket(path: Path, template: RowBlock) -> RowBlock | None:
    """Read every record of one bucket file, in order.

    Parameters
    ----------
    path
        The bucket's file; a missing or empty file is an empty bucket.
    template
        A block (typically zero rows) with the records' layout and dtypes.

    Returns
    -------
    The bucket's rows, or None when it has none.

    Raises
    ------
    OSError
        If the file ends inside a record.
    """
    if not path.exists() or path.stat().st_size == 0:
        return None
    dtypes = [a.dtype for a in template.arrays()]
    sizes = np.array([d.itemsize for d in dtypes], dtype=np.int64)
    totals = np.zeros(len(dtypes), dtype=np.int64)
    with path.open("rb") as f:
        while header := f.read(8 * len(dtypes)):
            counts = np.frombuffer(header, dtype=np.int64)
            totals += counts
            f.seek(int(counts @ sizes), 1)
    out = [np.empty(int(n), dtype=d) for n, d in zip(totals, dtypes, strict=True)]
    filled = np.zeros(len(dtypes), dtype=np.int64)
    with path.open("rb") as f:
        while header := f.read(8 * len(dtypes)):
            counts = np.frombuffer(header, dtype=np.int64)
            for array, start, count in zip(out, filled.tolist(), counts.tolist(), strict=True):
                if count == 0:
                    continue
                view = array[start : start + count].data.cast("B")
                if f.readinto(view) != view.nbytes:
                    msg = f"spill file {path} is truncated"
                    raise OSError(msg)
            filled += counts
    return from_arrays(out, template)
