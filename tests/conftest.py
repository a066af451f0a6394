from __future__ import annotations

from pathlib import Path

import anndata as ad
import grpc
import pytest
import scipy.sparse as sp
import zarr

from annserve.client import CSRArrays
from annserve.server import create_server, open_store
from annserve.server.io.ranges import ZARRS_PIPELINE
from annserve.v1 import annserve_pb2 as pb

#: fixtures shared by the operations tests (``start``: in-process servers with options)
pytest_plugins = ["ops_support"]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL = {
    "pbmc3k": "pbmc3k_raw.h5ad",  # CSR counts, 32,738 genes
    "wu2020": "wu2020_200_counts.h5ad",  # CSR counts, categorical obs
    "pbmc68k": "pbmc68k_reduced.h5ad",  # dense X, categorical + numeric obs
    "mouse10x": "mouse10x_10k_subset.h5ad",  # 10,000 cells x 1,000 genes, CSR counts
}


def real_path(name: str) -> Path:
    path = DATA / REAL[name]
    if not path.exists():
        pytest.skip(f"real dataset {path} not present")
    return path


@pytest.fixture(scope="session")
def real_adata():
    """In-memory AnnData of each real dataset, the reference every test compares against."""
    cache: dict[str, ad.AnnData] = {}

    def load(name: str) -> ad.AnnData:
        if name not in cache:
            cache[name] = ad.read_h5ad(real_path(name))
        return cache[name]

    return load


@pytest.fixture(scope="session")
def zarr_stores(tmp_path_factory, real_adata):
    """Zarr copies of the real datasets in both on-disk zarr formats, written by anndata."""
    root = tmp_path_factory.mktemp("zarr")

    def make(name: str, zarr_format: int) -> Path:
        path = root / f"{name}.v{zarr_format}.zarr"
        if not path.exists():
            src = real_adata(name)
            # X, obs and var are what annserve serves; uns of pbmc68k has structured arrays
            # that zarr v3 has no stable encoding for
            slim = ad.AnnData(X=src.X, obs=src.obs, var=src.var)
            with ad.settings.override(zarr_write_format=zarr_format):
                slim.write_zarr(path)
        return path

    return make


@pytest.fixture(params=["h5ad", "zarr-v2", "zarr-v3", "zarr-v2-zarrs", "zarr-v3-zarrs"])
def store_format(request):
    """On-disk format; ``-zarrs`` reads through the zarrs codec pipeline, as the daemon does."""
    if request.param.endswith("-zarrs"):
        with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
            yield request.param
    else:
        yield request.param


@pytest.fixture
def store_path(store_format, zarr_stores):
    """Path of a real dataset in the parametrized on-disk format."""

    def path(name: str) -> Path:
        if store_format == "h5ad":
            return real_path(name)
        return zarr_stores(name, int(store_format.split("-")[1][1]))

    return path


#: Seconds a test server gets to stop once its calls are cancelled.
STOP_TIMEOUT_S = 10.0


def stop_now(server: grpc.Server, timeout: float = STOP_TIMEOUT_S) -> None:
    """Cancel the server's calls and wait up to ``timeout`` s for it to stop; fail if not.

    ``server.stop(None)`` waits for the shutdown itself, without bound; a grace of 0
    cancels the calls at once too (on a thread of grpc's), and the wait is ours.
    """
    assert server.stop(0).wait(timeout), f"server not stopped {timeout:g} s after cancelling"


@pytest.fixture
def serve():
    """Start real servers on 127.0.0.1 with ephemeral ports; yields ``start(*paths) -> address``."""
    servers = []

    def start(*paths: Path) -> str:
        stores = {p.name: open_store(p) for p in paths}
        server, (port,) = create_server(stores, ["127.0.0.1:0"])
        servers.append(server)
        return f"127.0.0.1:{port}"

    try:
        yield start
    finally:
        for server in servers:
            stop_now(server)


def raw_stream(address: str, timeout: float = 30.0, **fields) -> list[bytes]:
    """Call StreamBatches directly (no client-side checks) and return all frames."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(
            "/annserve.v1.AnnServe/StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
        )
        return list(call(pb.StreamBatchesRequest(**fields), timeout=timeout))


def as_scipy(x) -> sp.csr_matrix:
    """A batch's X (CSRArrays or torch sparse CSR) as scipy CSR, pattern and order kept."""
    if isinstance(x, CSRArrays):
        return sp.csr_matrix((x.data, x.indices, x.indptr), shape=x.shape)
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    return sp.csr_matrix((val.numpy(), col.numpy(), crow.numpy()), shape=tuple(x.shape))
