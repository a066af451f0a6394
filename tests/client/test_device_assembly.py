"""Device-side assembly (``Output(assemble_on_device=...)``, ``annserve.client._device``).

On the CPU the device path is checked bit for bit against the CPU path on real data,
over TCP and over the same-host shared-memory transport; the narrow upload is checked
by its byte count; the widening of unsigned wire dtypes torch lacks, and batches whose
frames carry different value dtypes, on synthetic frames. The CUDA parts (pinned ring,
side stream, CuPy) are ``gpu``-marked and skip without CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from annserve.client import Output, RemoteLoader, _device
from annserve.client._device import (
    DeviceDelivery,
    DeviceStage,
    HostRing,
    StagedCSR,
    _widen,
    cupy_available,
)
from annserve.errors import FrameDecodeError, InvalidRequestError
from annserve.server import create_server, open_store
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import Frame
from conftest import real_path, stop_now

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
#: sparse real stores: uint16 counts and genes (pbmc3k, wu2020), uint8/uint16 (mouse10x)
SPARSE = ["pbmc3k", "wu2020", "mouse10x"]


@pytest.fixture
def unix_server(tmp_path):
    """A server on a unix socket serving the sparse stores; yields its unix address."""
    if not hasattr(os, "memfd_create"):
        pytest.skip("needs Linux memfd")
    sock = tmp_path / "annserve.sock"
    stores = {name: open_store(real_path(name)) for name in SPARSE}
    server, _ = create_server(stores, [f"unix:{sock}"])
    try:
        yield f"unix:{sock}"
    finally:
        stop_now(server)


def assert_same_batch(cpu: dict, dev: dict) -> None:
    """The device-assembled batch equals the CPU path's bit for bit, dtypes included."""
    assert torch.equal(cpu["index"], dev["index"])
    x, y = cpu["X"], dev["X"]
    assert x.layout == y.layout
    assert x.shape == y.shape
    assert x.dtype == y.dtype
    if x.layout == torch.sparse_csr:
        for part in ("crow_indices", "col_indices", "values"):
            a, b = getattr(x, part)(), getattr(y, part)()
            assert a.dtype == b.dtype, part
            assert torch.equal(a, b), part
    else:
        assert torch.equal(x, y)
    assert cpu["obs"].equals(dev["obs"])


def loaders(address: str, store: str, **output) -> tuple[RemoteLoader, RemoteLoader]:
    common = {"store": store, "batch_size": 300, "seed": 3, "return_index": True}
    return (
        RemoteLoader(address, **common, output=Output(**output)),
        RemoteLoader(address, **common, output=Output(assemble_on_device=True, **output)),
    )


@pytest.mark.parametrize("to_dense", [False, True], ids=["csr", "dense"])
@pytest.mark.parametrize("name", SPARSE)
def test_device_path_on_cpu_equals_cpu_path_over_tcp(serve, name, to_dense):
    cpu, dev = loaders(serve(real_path(name)), "", to_dense=to_dense)
    for _ in range(2):  # the second epoch reuses the host buffers of the first
        batches = 0
        for a, b in zip(cpu, dev, strict=True):
            assert_same_batch(a, b)
            batches += 1
        assert batches == len(cpu)
    assert dev.upload_stats["rows"] == 2 * dev.n_obs
    assert cpu.upload_stats == {"bytes": 0, "rows": 0}  # the CPU path uploads nothing


@pytest.mark.parametrize("name", ["pbmc3k", "mouse10x"])
def test_device_path_on_cpu_equals_cpu_path_over_shared_memory(unix_server, name):
    from annserve.client import Connection

    common = {"store": name, "batch_size": 256, "seed": 5, "return_index": True}
    conn = Connection(transport="shm")
    cpu = RemoteLoader(unix_server, **common, connection=conn)
    dev = RemoteLoader(
        unix_server, **common, connection=conn, output=Output(assemble_on_device=True)
    )
    rows = 0
    for a, b in zip(cpu, dev, strict=True):
        assert_same_batch(a, b)
        rows += len(b["index"])
    assert rows == dev.n_obs
    assert dev._shm is not None  # it did stream through shared memory


@pytest.mark.parametrize("name", SPARSE)
def test_upload_is_at_most_half_of_float32_and_int32(serve, name):
    cpu, dev = loaders(serve(real_path(name)), "")
    wide = 0  # bytes .to(device) moves for the CPU path's batches: values, indices, crow
    for batch in cpu:
        x = batch["X"]
        wide += sum(t.numel() * t.element_size() for t in (x.values(), x.col_indices()))
        wide += x.crow_indices().numel() * x.crow_indices().element_size()
    assert wide > 0
    for _ in dev:
        pass
    stats = dev.upload_stats
    assert stats["rows"] == dev.n_obs
    assert 0 < stats["bytes"] <= wide / 2


def test_dense_store_keeps_the_cpu_path(serve):
    cpu, dev = loaders(serve(real_path("pbmc68k")), "")
    for a, b in zip(cpu, dev, strict=True):
        assert b["X"].layout == torch.strided
        assert_same_batch(a, b)
    assert dev.upload_stats["bytes"] == 0


def test_an_abandoned_epoch_gives_its_host_buffers_back(serve):
    _, dev = loaders(serve(real_path("pbmc3k")), "")
    it = iter(dev)
    next(it)
    it.close()  # staged batches and the one in flight are dropped
    ring = dev._ring
    assert ring is not None
    assert not ring.busy
    assert all(slot.free() for slot in ring._slots)
    assert sum(1 for _ in dev) == len(dev) - 1  # the epoch resumes; the same ring serves it
    assert dev._ring is ring


def frame(batch_rows: int, row_start: int, data, indices, row_nnz) -> Frame:
    header = pb.BatchHeader(
        batch=0, batch_rows=batch_rows, row_start=row_start, n_rows=len(row_nnz), sparse=True
    )
    return Frame(
        header,
        {"data": np.asarray(data), "indices": np.asarray(indices), "row_nnz": np.asarray(row_nnz)},
    )


def test_frames_of_one_batch_with_different_value_dtypes():
    ring = HostRing(2)
    stage = DeviceStage(ring, n_vars=70_000)
    # uint8 counts then uint16 counts >= 32768 (the sign bit of int16), uint32 genes
    assert stage.take(frame(3, 0, np.array([1, 255], np.uint8), np.array([0, 69_999], np.uint32),
                            np.array([2], np.uint8)))  # fmt: skip
    assert stage.take(frame(3, 1, np.array([40_000, 65_535, 7], np.uint16),
                            np.array([65_535, 65_536, 3], np.uint32),
                            np.array([3, 0], np.uint16)))  # fmt: skip
    staged = stage.result()
    segments = staged.slot.segments  # same dtype: one segment; another dtype: a new one
    assert [len(segments[k]) for k in ("data", "indices", "lengths")] == [2, 1, 2]
    assert isinstance(staged, StagedCSR)
    assert staged.shape == (3, 70_000)
    assert staged.nnz == 5
    delivery = DeviceDelivery(ring, torch.device("cpu"), torch.float32)
    (batch,) = delivery.deliver(iter([{"X": staged}]))
    x = batch["X"]
    assert x.values().tolist() == [1.0, 255.0, 40_000.0, 65_535.0, 7.0]
    assert x.values().dtype == torch.float32
    assert x.col_indices().tolist() == [0, 69_999, 65_535, 65_536, 3]
    assert x.col_indices().dtype == torch.int32
    assert x.crow_indices().tolist() == [0, 2, 5, 5]
    assert ring.uploaded_rows == 3
    assert all(slot.free() for slot in ring._slots)


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (np.uint16, [0, 1, 32_767, 32_768, 65_535]),
        (np.uint32, [0, 2**31 - 1, 2**31, 2**32 - 1]),
        (np.int64, [-(2**40), 0, 2**40]),
        (np.float64, [0.1, -3.5, 1e30]),
        (np.float16, [0.5, 65_504.0]),
    ],
)
@pytest.mark.parametrize("unsigned_copy", [True, False], ids=["torch-uint", "signed-mask"])
def test_widening_matches_numpy(dtype, values, unsigned_copy, monkeypatch):
    # torch's own uint16/uint32 copy where the device has it, else signed view + mask
    monkeypatch.setitem(_device._UNSIGNED_OK, "cpu", unsigned_copy)
    src = np.array(values, dtype=dtype)
    wire = torch.from_numpy(np.concatenate([np.zeros(8, np.uint8), src.view(np.uint8)]))
    out = torch.empty(len(src), dtype=torch.float32)
    _widen(wire, 8, src.dtype, len(src), out)
    np.testing.assert_array_equal(out.numpy(), src.astype(np.float32))
    out64 = torch.empty(len(src), dtype=torch.float64)
    _widen(wire, 8, src.dtype, len(src), out64)
    np.testing.assert_array_equal(out64.numpy(), src.astype(np.float64))


def test_malformed_frames_are_refused():
    stage = DeviceStage(HostRing(1), n_vars=10)
    with pytest.raises(FrameDecodeError, match="out of range"):
        stage.take(frame(1, 0, np.array([1], np.uint8), np.array([10], np.uint16),
                         np.array([1], np.uint8)))  # fmt: skip
    with pytest.raises(FrameDecodeError, match="disagree"):
        stage.take(frame(1, 0, np.array([1], np.uint8), np.array([1, 2], np.uint16),
                         np.array([2], np.uint8)))  # fmt: skip


def test_output_options():
    assert Output().assembly_device is None
    assert Output(device="cpu").assembly_device is None
    assert Output(assemble_on_device=True).assembly_device == torch.device("cpu")
    assert Output(device="cpu", assemble_on_device=False).assembly_device is None
    with pytest.raises(InvalidRequestError, match="to_torch"):
        Output(to_torch=False, assemble_on_device=True)
    with pytest.raises(InvalidRequestError, match="CUDA device"):
        Output(cupy=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors raised without CUDA")
def test_cuda_and_cupy_without_a_device_are_clear_errors():
    with pytest.raises(InvalidRequestError, match="CUDA"):
        Output(device="cuda", cupy=True)
    with pytest.raises(InvalidRequestError, match="CUDA"):
        Output(device="cuda:0", assemble_on_device=True)


# --- on a CUDA device ----------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("to_dense", [False, True], ids=["csr", "dense"])
def test_cuda_batches_equal_cpu_batches_bit_for_bit(serve, to_dense):
    address = serve(real_path("pbmc3k"))
    common = {"batch_size": 300, "seed": 3, "return_index": True}
    cpu = RemoteLoader(address, **common, output=Output(to_dense=to_dense))
    gpu = RemoteLoader(address, **common, output=Output(device="cuda", to_dense=to_dense))
    assert gpu.output.assembly_device == torch.device("cuda")  # the default on CUDA
    for _ in range(2):
        for a, b in zip(cpu, gpu, strict=True):
            assert b["X"].is_cuda
            assert b["index"].is_cuda
            assert_same_batch(a, {**b, "X": b["X"].cpu(), "index": b["index"].cpu()})
    ring = gpu._ring
    assert ring is not None
    assert ring.pinned
    assert all(buf.is_pinned() for slot in ring._slots for buf in slot.host.values())


@pytest.mark.gpu
@needs_cuda
def test_cuda_uploads_run_on_a_side_stream_and_memory_stays_bounded(serve):
    address = serve(real_path("mouse10x"))
    gpu = RemoteLoader(address, batch_size=1000, seed=0, output=Output(device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    largest = 0
    for batch in gpu:  # dropped at once: at most AHEAD + 2 batches on the device
        x = batch["X"]
        largest = max(largest, sum(t.numel() * t.element_size() for t in
                                   (x.values(), x.col_indices(), x.crow_indices())))  # fmt: skip
        torch.cuda.current_stream().synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert 0 < peak <= 6 * largest  # outputs of 3 batches + transient narrow bytes
    stats = gpu.upload_stats
    assert stats["rows"] == gpu.n_obs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not cupy_available(), reason="needs the gpu extra (cupy-cuda12x)")
def test_cupy_output_shares_the_tensors_memory(serve, real_adata):
    import cupy
    import cupyx.scipy.sparse

    adata = real_adata("wu2020")
    loader = RemoteLoader(
        serve(real_path("wu2020")),
        batch_size=64,
        return_index=True,
        output=Output(device="cuda", cupy=True),
        seed=0,
    )
    rows = 0
    for batch in loader:
        x = batch["X"]
        assert isinstance(x, cupyx.scipy.sparse.csr_matrix)
        assert x.dtype == cupy.float32
        assert x.indices.dtype == cupy.int32
        idx = cupy.asnumpy(batch["index"])
        np.testing.assert_array_equal(x.get().toarray(), adata.X[idx].toarray())
        rows += len(idx)
    assert rows == adata.n_obs


def test_gpu_check_helper_runs_in_dry_mode(serve, monkeypatch):
    """benchmarks/gpu_check.py's rows and table, on the CPU (what gpu_check.sh DRY=1 runs)."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("gpu_check", bench / "gpu_check.py")
    assert spec is not None
    assert spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    args = argparse.Namespace(
        device="cpu", to_dense=False, batch_size=512, seed=0, transport="tcp", max_cells=10**9
    )
    address = serve(real_path("pbmc3k"))
    rows = {row: gpu_check.run_row(address, row, args) for row in ("device-csr", "cpu-then-to")}
    assert {r["cells"] for r in rows.values()} == {2700}
    assert (
        0
        < rows["device-csr"]["h2d_bytes_per_cell"]
        <= rows["cpu-then-to"]["h2d_bytes_per_cell"] / 2
    )
    text = gpu_check.table([*rows.values(), {"row": "annbatch", "device": "unavailable: x"}])
    assert text.count("\n") == 4  # header, rule, three rows
    assert "| device-csr | cpu |" in text
