"""The store-format contract shared by the writer (``annserve convert``) and the reader.

What ``annserve convert`` writes and the daemon reads must agree on a few names and on
one rule: where the manifest lies in a collection's root attributes, how annbatch
recognises the collection, and how values are narrowed without loss (counts stored as
uint16 on disk, sent as the smallest unsigned integer type on the wire). Both sides
import them from here; this module imports neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    #: Allocates an uninitialised array, ``empty(shape, dtype)``, like :func:`numpy.empty`.
    Empty = Callable[[tuple[int, ...], np.dtype], np.ndarray]

__all__ = [
    "ANNBATCH_MARKER",
    "CHECK_BLOCK",
    "MANIFEST_KEY",
    "NARROW_UINTS",
    "cast_into",
    "lossless_cast",
    "smallest_uint",
]

#: Root attribute of a collection holding the manifest written by ``annserve convert``.
MANIFEST_KEY = "annserve"
#: Root attributes annbatch's ``DatasetCollection`` recognises its collections by.
ANNBATCH_MARKER = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
#: Unsigned integer dtypes values are narrowed to, narrowest first.
NARROW_UINTS = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
#: Values compared at a time when checking that narrowing lost nothing.
CHECK_BLOCK = 1 << 16


def smallest_uint(max_value: int) -> np.dtype | None:
    """Return the smallest unsigned dtype holding ``0..max_value``, None if over uint32."""
    return next((dt for dt in NARROW_UINTS if max_value <= np.iinfo(dt).max), None)


def lossless_cast(
    values: np.ndarray, dtype: np.dtype, empty: Empty = np.empty, block: int = CHECK_BLOCK
) -> np.ndarray | None:
    """Return ``values`` cast to ``dtype`` if every value survives unchanged, else None.

    Cast and compared ``block`` values at a time: temporaries stay small and in cache,
    and the first block that loses something (a fraction, a negative, NaN, a value out
    of range) ends the work.

    Parameters
    ----------
    values
        Any shape, numeric dtype.
    dtype
        Target dtype, e.g. uint16.
    empty
        Allocates the result, ``empty(shape, dtype)``.
    block
        Values cast and compared at a time.

    Returns
    -------
    An array of ``values.shape`` and ``dtype`` equal to ``values``, or None.
    """
    out = empty(values.shape, dtype)
    src, dst = values.reshape(-1), out.reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):  # losses are caught by the comparison
        for i in range(0, len(src), block):
            np.copyto(dst[i : i + block], src[i : i + block], casting="unsafe")
            if not np.array_equal(dst[i : i + block], src[i : i + block]):
                return None
    return out


def cast_into(values: np.ndarray, dtype: np.dtype, empty: Empty) -> np.ndarray:
    """Return ``values`` cast to ``dtype`` (unchecked) in an array from ``empty``."""
    out = empty(values.shape, dtype)
    np.copyto(out, values, casting="unsafe")
    return out
