from __future__ import annotations

import mmap
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from annserve.buffers import MIN_POOLED_BYTES, BufferPool
from annserve.memory import retain_freed_memory, small_pages

N = MIN_POOLED_BYTES  # float32 elements: 4x the pooling threshold


def test_buffer_in_use_is_never_handed_out_again():
    pool = BufferPool()
    a = pool.empty((N,), np.float32)
    a[:] = 0
    tensor = torch.from_numpy(a[10:])  # what a yielded batch holds
    del a
    b = pool.empty((N,), np.float32)
    assert not np.shares_memory(b, tensor.numpy())
    b[:] = 1
    assert not torch.any(tensor == 1)


def test_released_buffer_is_reused():
    pool = BufferPool()
    a = pool.empty((N,), np.float32)
    address = a.__array_interface__["data"][0]
    del a
    b = pool.empty((N // 2, 2), np.int32)
    assert b.__array_interface__["data"][0] == address
    assert b.shape == (N // 2, 2)
    assert b.dtype == np.int32


def test_small_arrays_are_not_pooled():
    pool = BufferPool()
    small = pool.empty((16,), np.float32)
    assert small.base is None


def test_pool_size_is_bounded():
    pool = BufferPool(max_buffers=2)
    held = [pool.empty((N,), np.float32) for _ in range(5)]
    assert len(held) == 5
    assert len(pool._buffers) == 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_thresholds_are_set_on_glibc():
    assert retain_freed_memory()
    assert retain_freed_memory()  # once per process, then cached


@pytest.mark.parametrize(("env", "changed"), [({}, True), ({"NUMPY_MADVISE_HUGEPAGE": "1"}, False)])
def test_numpy_huge_pages_are_turned_off_unless_numpy_is_told(env, changed):
    # a fresh process: the setting is process-wide; numpy's switch returns the old value
    script = (
        "import numpy as np\n"
        "from annserve.memory import avoid_huge_pages\n"
        "changed = avoid_huge_pages()\n"
        "before = np._core.multiarray._set_madvise_hugepage(True)\n"
        "print(changed, before)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert out == [str(changed), str(not changed)]


def _vm_flags(address: int) -> list[str]:
    """The ``VmFlags`` of the mapping of this process that holds ``address``."""
    lines = iter(Path("/proc/self/smaps").read_text().splitlines())
    for line in lines:
        span = line.split()[0]
        if "-" in span and not span.endswith(":"):
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= address < hi:
                for field in lines:
                    if field.startswith("VmFlags:"):
                        return field.split()[1:]
    msg = f"no mapping holds {address:#x}"
    raise AssertionError(msg)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_pooled_buffers_are_backed_by_small_pages():
    # numpy marks arrays of 4 MiB and more for huge pages ("hg"); pooled buffers are not
    pooled = BufferPool().empty((8 << 20,), np.uint8)
    middle = pooled.nbytes // 2
    assert "nh" in _vm_flags(pooled.ctypes.data + middle)
    with mmap.mmap(-1, 8 << 20) as fresh:  # a mapping never advised (the heap may have been)
        address = np.frombuffer(fresh, np.uint8).ctypes.data
        assert "nh" not in _vm_flags(address + middle)
    assert not small_pages(np.empty(16, np.uint8))  # within one page: nothing to advise
