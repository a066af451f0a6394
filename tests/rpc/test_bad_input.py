"""Bad requests get a clear status naming the field, and the server keeps serving."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import anndata as ad
import grpc
import numpy as np
import pytest
import scipy.sparse as sp

from annserve.client import Connection, RemoteLoader
from annserve.errors import (
    InvalidRequestError,
    ServerUnavailableError,
    StoreFormatError,
    StoreNotFoundError,
)
from annserve.server import open_store
from conftest import raw_stream, real_path

GOOD = {"batch_size": 64, "chunk_size": 8, "preload_nchunks": 4, "return_index": True}


@pytest.fixture
def address(serve):
    return serve(real_path("wu2020"))


def served_rows(address: str) -> int:
    from annserve.wire import decode_frame

    return sum(decode_frame(f).header.n_rows for f in raw_stream(address, **GOOD))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("batch_size", 0),
        ("batch_size", -5),
        ("chunk_size", 0),
        ("chunk_size", -1),
        ("preload_nchunks", 0),
        ("preload_nchunks", -3),
        ("epoch", -1),
    ],
)
def test_bad_size_is_invalid_argument_naming_field(address, field, value):
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, **{**GOOD, field: value})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    assert served_rows(address) == 200  # the server still serves a good request


def test_unknown_obs_key_lists_allowed_columns(address):
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, **GOOD, obs_keys=["patient", "cell_type"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert "obs_keys" in details
    assert "cell_type" in details
    assert "cluster_orig" in details  # an allowed value is named
    assert served_rows(address) == 200


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"encoding": 99}, "encoding"),
        ({"compression": 42}, "compression"),
        ({"compression": 1, "compression_level": 23}, "compression_level"),
        ({"compression": 3, "compression_level": -1}, "compression_level"),
        ({"compression": 2, "compression_level": 4}, "compression_level"),
    ],
)
def test_unknown_wire_option_is_invalid_argument(address, fields, named):
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, **GOOD, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in err.value.details()
    assert served_rows(address) == 200


def test_unknown_store_name_is_not_found(address):
    with pytest.raises(grpc.RpcError) as err:
        raw_stream(address, **GOOD, store="elsewhere")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "elsewhere" in err.value.details()
    with pytest.raises(StoreNotFoundError, match="elsewhere"):
        RemoteLoader(address, store="elsewhere", connection=Connection(timeout=5))


def test_client_checks_before_streaming(address):
    with pytest.raises(InvalidRequestError, match="batch_size"):
        RemoteLoader(address, batch_size=0, connection=Connection(timeout=5))
    with pytest.raises(InvalidRequestError, match="obs_keys.*cell_type"):
        RemoteLoader(address, obs_keys=["cell_type"], connection=Connection(timeout=5))
    with pytest.raises(InvalidRequestError, match="encoding"):
        RemoteLoader(address, connection=Connection(encoding="gzip", timeout=5))
    with pytest.raises(InvalidRequestError, match="compression"):
        RemoteLoader(address, connection=Connection(compression="gzip", timeout=5))
    with pytest.raises(InvalidRequestError, match="epoch"):
        RemoteLoader(address, connection=Connection(timeout=5)).set_epoch(-1)


def test_server_down_is_a_connection_error_naming_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}") as err:
        RemoteLoader(f"127.0.0.1:{port}", connection=Connection(timeout=2))
    assert isinstance(err.value, ServerUnavailableError)
    assert time.monotonic() - start < 30  # a bounded wait, not a hang


def test_missing_store_path(tmp_path):
    with pytest.raises(StoreNotFoundError, match="nope.h5ad"):
        open_store(tmp_path / "nope.h5ad")


@pytest.mark.parametrize(
    "content", [b"", b"not an hdf5 file at all", b"\x89HDF\r\n\x1a\n" + bytes(64)]
)
def test_unreadable_store_file(tmp_path, content):
    path = tmp_path / "bad.h5ad"
    path.write_bytes(content)
    with pytest.raises(StoreFormatError, match="bad.h5ad"):
        open_store(path)


def test_truncated_h5ad(tmp_path):
    path = tmp_path / "truncated.h5ad"
    full = real_path("wu2020").read_bytes()
    path.write_bytes(full[: len(full) // 3])
    with pytest.raises(StoreFormatError, match="truncated.h5ad"):
        open_store(path)


def test_directory_that_is_not_anndata(tmp_path):
    with pytest.raises(StoreFormatError):
        open_store(tmp_path)


def test_csc_x_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "csc.h5ad"
    ad.AnnData(
        sp.random(20, 10, density=0.3, format="csc", dtype=np.float32, random_state=0)
    ).write_h5ad(path)
    with pytest.raises(StoreFormatError, match="CSC"):
        open_store(path)


def test_cli_exits_nonzero_with_one_line_on_a_corrupt_store(tmp_path):
    path = tmp_path / "corrupt.h5ad"
    path.write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "annserve.server.rpc.cli", "--store", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "corrupt.h5ad" in lines[0]
