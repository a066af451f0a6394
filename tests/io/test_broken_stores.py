"""Broken stores are refused at start-up or end the stream with DATA_LOSS: never zeros.

Real data (mouse10x, 10,000 cells, 691,914 non-zeros) is written with small chunks
(14 chunk files per CSR array, or 7 shards of 10 chunks) and then broken: a chunk
file deleted, overwritten or truncated, a shard index entry marked absent, an HDF5
chunk left unallocated.
"""

from __future__ import annotations

import shutil
import subprocess

import anndata as ad
import google_crc32c
import grpc
import h5py
import numpy as np
import pytest
import zarr

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import DataLossError
from annserve.server import open_store
from conftest import raw_stream
from ops_support import annserve_command

CHUNK = 50_000  # values per chunk of the unsharded CSR arrays
INNER, SHARD = 10_000, 100_000  # values per inner chunk and per shard
RPC_TIMEOUT = 30.0  # seconds
#: dataset_kwargs of each zarr layout (anndata applies them to every array it writes)
ZARR_LAYOUTS = {
    "zarr-v2": (2, {"chunks": (CHUNK,)}),
    "zarr-v3": (3, {"chunks": (CHUNK,)}),
    "zarr-v3-sharded": (3, {"chunks": (INNER,), "shards": (SHARD,)}),
    # plain bytes: read straight from the chunk files, not through zarr
    "zarr-v3-uncompressed": (3, {"chunks": (CHUNK,), "compressors": None}),
}
#: the first chunk (or shard) file of X/data in each zarr layout
FIRST = {"zarr-v2": "0", "zarr-v3": "c/0", "zarr-v3-sharded": "c/0", "zarr-v3-uncompressed": "c/0"}


@pytest.fixture(scope="module")
def mouse(real_adata):
    """mouse10x with X, obs and var only."""
    src = real_adata("mouse10x")
    return ad.AnnData(X=src.X, obs=src.obs, var=src.var)


@pytest.fixture(scope="module")
def written(tmp_path_factory, mouse):
    """Return the path of mouse10x written in a layout (written once per module)."""
    root = tmp_path_factory.mktemp("written")
    paths = {}

    def write(layout: str):
        if layout not in paths:
            if layout == "h5ad-gzip":
                path = root / "mouse.h5ad"
                mouse.write_h5ad(path, compression="gzip")
            else:
                path = root / f"{layout}.zarr"
                zarr_format, kwargs = ZARR_LAYOUTS[layout]
                with ad.settings.override(zarr_write_format=zarr_format):
                    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
                    ad.io.write_elem(group, "/", mouse, dataset_kwargs=kwargs)
            paths[layout] = path
        return paths[layout]

    return write


@pytest.fixture
def copy_of(tmp_path, written):
    """Return a fresh copy of a written store, free to break."""

    def copy(layout: str, name: str = "broken"):
        src = written(layout)
        dst = tmp_path / f"{name}{src.suffix}"
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        return dst

    return copy


def loader(address: str, store: str) -> RemoteLoader:
    return RemoteLoader(
        address,
        store=store,
        batch_size=1000,
        chunk_size=100,
        preload_nchunks=10,
        seed=0,
        output=Output(to_torch=False),
        connection=Connection(timeout=RPC_TIMEOUT, retries=0),
    )


def stream_error(address: str, store: str) -> DataLossError:
    """Stream an epoch of ``store``; return the DataLossError it must end with."""
    with pytest.raises(DataLossError) as caught:
        for _ in loader(address, store):
            pass
    return caught.value


def corrupt(path, offset: int = 0, n: int = 16) -> None:
    """Overwrite ``n`` bytes of a file from ``offset`` (a compressed frame's header)."""
    raw = bytearray(path.read_bytes())
    raw[offset : offset + n] = b"\xab" * n
    path.write_bytes(bytes(raw))


def truncate(path, keep: int = 5000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# --- refused at start-up -------------------------------------------------------------
@pytest.mark.parametrize("layout", list(ZARR_LAYOUTS))
@pytest.mark.parametrize("array", ["data", "indices"])
def test_open_refuses_a_missing_chunk(copy_of, layout, array):
    path = copy_of(layout)
    last = "c/6" if layout == "zarr-v3-sharded" else FIRST[layout].replace("0", "13")
    (path / "X" / array / last).unlink()
    with pytest.raises(DataLossError, match=rf"X/{array}: 1 chunk.* {last};"):
        open_store(path)


def test_open_refuses_a_chunk_a_shard_index_marks_absent(copy_of):
    path = copy_of("zarr-v3-sharded")
    shard = path / "X" / "data" / "c" / "2"
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(raw[-(16 * 10 + 4) : -4], "<u8").reshape(10, 2).copy()
    index[3] = 2**64 - 1  # the zarr sharding spec's "no such chunk"
    raw[-(16 * 10 + 4) :] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(
        4, "little"
    )
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataLossError, match=r"X/data: .*c/2 \(inner chunk 3 of that shard\)"):
        open_store(path)


def test_open_refuses_a_truncated_shard(copy_of):
    path = copy_of("zarr-v3-sharded")
    truncate(path / "X" / "indices" / "c" / "1")
    with pytest.raises(DataLossError, match=r"X/indices: shard c/1: .*truncated"):
        open_store(path)


def test_open_refuses_an_unallocated_hdf5_chunk(tmp_path, written):
    path = tmp_path / "broken.h5ad"
    shutil.copyfile(written("h5ad-gzip"), path)
    with h5py.File(path, "r+") as f:
        values = f["X/data"][...]
        chunk = f["X/data"].chunks[0]
        del f["X/data"]
        ds = f.create_dataset("X/data", shape=values.shape, dtype=values.dtype, chunks=(chunk,))
        ds[: 2 * chunk] = values[: 2 * chunk]  # chunk 2 is never written
        ds[3 * chunk :] = values[3 * chunk :]
    with pytest.raises(DataLossError, match=r"X/data: 1 chunk.*: 2;"):
        open_store(path)


def test_daemon_exits_3_naming_the_array_and_chunk(copy_of):
    path = copy_of("zarr-v3")
    (path / "X" / "data" / "c" / "4").unlink()
    done = subprocess.run(
        [*annserve_command(), "--store", str(path), "--host", "127.0.0.1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3, done.stderr
    assert "X/data" in done.stderr
    assert "c/4" in done.stderr


# --- discovered while streaming ------------------------------------------------------
@pytest.mark.parametrize("layout", list(ZARR_LAYOUTS))
def test_chunk_deleted_while_serving_ends_the_stream(serve, copy_of, mouse, layout):
    broken, good = copy_of(layout), copy_of(layout, "good")
    address = serve(broken, good)
    (broken / "X" / "data" / FIRST[layout]).unlink()
    error = stream_error(address, broken.name)
    assert f"store {broken.name!r}: X/data: chunk {FIRST[layout]}" in str(error)
    assert "missing" in str(error)
    assert str(broken.parent) not in str(error)  # the client sees the store's name, no path
    # the other store of the server is served whole
    assert sum(len(b["X"].indptr) - 1 for b in loader(address, good.name)) == mouse.n_obs


@pytest.mark.parametrize(
    ("layout", "chunk", "named"),
    [
        ("zarr-v2", "0", "chunk 0 "),  # Blosc LZ4
        ("zarr-v3", "c/0", "chunk c/0 "),  # zstd
        ("zarr-v3-sharded", "c/0", "chunk c/0 (inner chunk 0 of that shard) "),
    ],
)
def test_corrupt_chunk_ends_the_stream_with_data_loss(serve, copy_of, layout, chunk, named):
    path = copy_of(layout)
    address = serve(path)
    corrupt(path / "X" / "data" / chunk)
    error = stream_error(address, path.name)
    assert f"X/data: {named}cannot be read" in str(error)
    assert "Traceback" not in str(error)
    assert "see server log" not in str(error)


def test_corrupt_hdf5_chunk_ends_the_stream_with_data_loss(serve, copy_of):
    path = copy_of("h5ad-gzip")
    with h5py.File(path) as f:
        info = f["X/indices"].id.get_chunk_info(1)
    corrupt(path, info.byte_offset, 64)
    address = serve(path)
    error = stream_error(address, path.name)
    assert "X/indices: chunk 1 cannot be read" in str(error)


@pytest.mark.parametrize("layout", ["zarr-v3-sharded", "zarr-v3-uncompressed"])
def test_file_truncated_while_serving_ends_the_stream(serve, copy_of, layout):
    path = copy_of(layout)
    address = serve(path)
    truncate(path / "X" / "indices" / "c" / "0")
    error = stream_error(address, path.name)
    assert f"store {path.name!r}: X/indices: chunk c/0" in str(error)


def test_status_is_data_loss_on_the_wire(serve, copy_of):
    path = copy_of("zarr-v3")
    address = serve(path)
    (path / "X" / "data" / "c" / "0").unlink()
    with pytest.raises(grpc.RpcError) as caught:
        raw_stream(
            address,
            RPC_TIMEOUT,
            store=path.name,
            batch_size=1000,
            chunk_size=100,
            preload_nchunks=10,
        )
    assert caught.value.code() == grpc.StatusCode.DATA_LOSS
    assert "X/data: chunk c/0" in caught.value.details()
