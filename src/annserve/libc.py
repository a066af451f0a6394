"""Functions of the C library that Python does not wrap, looked up once per process."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)


@cache
def function(symbol: str) -> Any:
    """Return the C library's function ``symbol`` (errno kept), or None where it has none.

    Parameters
    ----------
    symbol
        E.g. ``"pwritev"``, ``"mallopt"``, ``"prctl"``. The same object is returned to
        every caller, so its ``argtypes``/``restype``, when set, are set for all.

    Returns
    -------
    A :class:`ctypes` function whose calls save ``errno`` (:func:`ctypes.get_errno`);
    None where the C library lacks the symbol (musl or macOS for glibc's) or cannot
    be loaded.
    """
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name, use_errno=True), symbol)
    except (OSError, AttributeError, TypeError):
        logger.debug("no %s in the C library %r", symbol, name)
        return None
