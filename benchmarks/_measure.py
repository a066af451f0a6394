"""Measurement loop shared by the benchmark workers (standard library only).

Imported by ``loader_worker.py`` (the annserve environment) and by
``annbatch_worker.py`` (the separate Python 3.12 environment), so it must not
import annserve, anndata or zarr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: Bytes of X payload per non-zero: a float32 value and an int32 column index.
BYTES_PER_NNZ = 8


def proc_status_mb(field: str, pid: int | str = "self") -> float:
    """Return a memory field of ``/proc/<pid>/status`` (e.g. ``VmHWM``, ``VmRSS``), MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    msg = f"{field} not in /proc/{pid}/status"
    raise KeyError(msg)


def process_cpu_seconds(pid: int) -> float:
    """CPU time another process has used so far, user + system, all threads, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time this process has used so far, user + system, all threads, seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drop_page_cache() -> None:
    """Write dirty pages back and drop the kernel's page cache (Linux, root only).

    Raises
    ------
    PermissionError
        If the process may not write ``/proc/sys/vm/drop_caches``.
    """
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def measure(
    setup: Callable[[], Callable[[int], Iterable[dict[str, Any]]]],
    max_cells: int | None,
    warmup_epochs: int = 0,
    server_pid: int | None = None,
    cold: bool = False,
) -> dict[str, float]:
    """Build a loader, consume one epoch (or ``max_cells`` cells) and time it.

    Consuming a batch means summing the values of its X (a torch sparse CSR
    tensor), which touches every value as a model's first layer would (~1 ms per
    4,096-cell batch); the sums add up to a checksum that must agree, up to float32
    rounding, between loaders of the same data.

    Parameters
    ----------
    setup
        Returns ``epoch(i)``, the iterable of epoch ``i``'s batches ``{"X": tensor,
        ...}``; its run time is the setup time (open the store, connect, load into
        memory...).
    max_cells
        Stop after the batch that reaches this many cells; None for a full epoch.
    warmup_epochs
        Epochs (each up to ``max_cells``) consumed before the measured one, in the
        same process: the steady state of a long training run, where buffers and
        caches already exist.
    server_pid
        A daemon serving the batches; its CPU over the measured epoch is reported too.
    cold
        Drop the page cache just before the measured epoch (:func:`drop_page_cache`),
        so that its reads come from disk, as for an atlas larger than memory.

    Returns
    -------
    ``cells``, ``nnz``, ``batches``, ``checksum``, ``setup_s``, ``first_batch_s``
    (from asking for the first batch to having it), ``seconds`` (from asking for
    the first batch to having consumed the last), ``cpu_s`` (process CPU over those
    seconds), ``rss_base_mb`` (RSS after imports, before setup) and
    ``rss_peak_mb`` (VmHWM at the end); ``server_cpu_s`` with ``server_pid``.
    """
    rss_base = proc_status_mb("VmRSS")
    t_setup = time.perf_counter()
    epoch = setup()
    setup_s = time.perf_counter() - t_setup
    for i in range(warmup_epochs):
        _consume(epoch(i), max_cells, time.perf_counter())
    if cold:
        drop_page_cache()
    t0 = time.perf_counter()
    cpu0 = cpu_seconds()
    server0 = process_cpu_seconds(server_pid) if server_pid else 0.0
    result = _consume(epoch(warmup_epochs), max_cells, t0)
    result.update(
        setup_s=setup_s,
        seconds=time.perf_counter() - t0,
        cpu_s=cpu_seconds() - cpu0,
        rss_base_mb=rss_base,
        rss_peak_mb=proc_status_mb("VmHWM"),
    )
    if server_pid:
        result["server_cpu_s"] = process_cpu_seconds(server_pid) - server0
    return result


def _consume(
    batches: Iterable[dict[str, Any]], max_cells: int | None, t0: float
) -> dict[str, float]:
    cells = nnz = n_batches = 0
    checksum = 0.0
    first = None
    for batch in batches:
        x = batch["X"]
        values = x.values()
        checksum += float(values.sum())
        if first is None:
            first = time.perf_counter() - t0
        cells += x.shape[0]
        nnz += values.numel()
        n_batches += 1
        if max_cells is not None and cells >= max_cells:
            break
    return {
        "cells": cells,
        "nnz": nnz,
        "batches": n_batches,
        "checksum": checksum,
        "first_batch_s": first if first is not None else float("nan"),
    }


def emit(result: dict[str, Any]) -> None:
    """Print the result as the last line of stdout, JSON, for the orchestrator."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
