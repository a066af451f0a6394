"""TLS, mutual TLS and bearer tokens: in-process servers and the daemon's flags.

Certificates are generated at test time (``cryptography``), for 127.0.0.1.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from annserve.client import Connection, Output, RemoteLoader
from annserve.errors import AuthenticationError, ServerUnavailableError
from annserve.server import open_store
from annserve.server.rpc.security import TLSConfig
from ops_support import (
    RPC_TIMEOUT,
    CountingStore,
    Daemon,
    make_pki,
    stream_call,
    write_tiny_store,
)

TOKEN = "s3cret-token"
FAIL_TIMEOUT = 2.0  # seconds a client waits for a handshake that cannot succeed


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("tiny") / "tiny.h5ad")


def epoch_rows(address: str, **connection) -> np.ndarray:
    loader = RemoteLoader(
        address,
        batch_size=64,
        output=Output(to_torch=False),
        return_index=True,
        connection=Connection(**connection),
    )
    return np.sort(np.concatenate([b["index"] for b in loader]))


# --- TLS -----------------------------------------------------------------------------
def test_tls_serves_a_client_trusting_the_ca_only(start, pki, tiny):
    tls = TLSConfig.from_files(pki.server_cert, pki.server_key)
    _, address = start({"tiny": open_store(tiny)}, tls=tls)
    ca = pki.ca.read_bytes()
    assert np.array_equal(epoch_rows(address, root_certificates=ca), np.arange(200))
    with pytest.raises(ServerUnavailableError):  # plaintext client: no handshake
        RemoteLoader(address, connection=Connection(timeout=FAIL_TIMEOUT))
    rogue = Connection(root_certificates=pki.rogue_cert.read_bytes(), timeout=FAIL_TIMEOUT)
    with pytest.raises(ServerUnavailableError):  # a CA that did not sign the server
        RemoteLoader(address, connection=rogue)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start, pki, tiny):
    tls = TLSConfig.from_files(pki.server_cert, pki.server_key, pki.ca)
    _, address = start({"tiny": open_store(tiny)}, tls=tls)
    ca = pki.ca.read_bytes()
    rows = epoch_rows(
        address,
        root_certificates=ca,
        certificate_chain=pki.client_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
    )
    assert np.array_equal(rows, np.arange(200))
    with pytest.raises(ServerUnavailableError):  # no client certificate
        RemoteLoader(address, connection=Connection(root_certificates=ca, timeout=FAIL_TIMEOUT))
    rogue = Connection(
        root_certificates=ca,
        certificate_chain=pki.rogue_cert.read_bytes(),
        private_key=pki.rogue_key.read_bytes(),
        timeout=FAIL_TIMEOUT,
    )
    with pytest.raises(ServerUnavailableError):  # a certificate from another CA
        RemoteLoader(address, connection=rogue)


# --- tokens ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong"),),
        (("authorization", TOKEN),),  # no scheme
        (("authorization", f"Basic {TOKEN}"),),
        (("authorization", f"Bearer {TOKEN}x"),),
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "longer"],
)
def test_bad_token_is_unauthenticated_and_the_store_is_never_read(start, tiny, metadata):
    counting = CountingStore(open_store(tiny))
    server, address = start({"tiny": counting.store}, tokens=frozenset({TOKEN}))
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as denied:
            list(
                stream_call(
                    channel, metadata=metadata, batch_size=8, chunk_size=8, preload_nchunks=2
                )
            )
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in denied.value.details()
        describe = channel.unary_unary(
            "/annserve.v1.AnnServe/DescribeStore", request_serializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as denied:
            describe(b"", timeout=RPC_TIMEOUT, metadata=metadata)
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # liveness probes need no token
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert counting.reads == 0
    assert server.service.open_streams() == 0
    samples = [s for m in server.metrics.registry.collect() for s in m.samples]
    assert not [s for s in samples if s.name == "annserve_streams_total"]  # none admitted
    errors = {
        (s.labels["method"].rsplit("/", 1)[-1], s.labels["code"]): s.value
        for s in samples
        if s.name == "annserve_rpc_errors_total"
    }
    assert errors == {
        ("StreamBatches", "UNAUTHENTICATED"): 1,
        ("DescribeStore", "UNAUTHENTICATED"): 1,
    }


def test_loader_token_is_required_and_works(start, tiny):
    counting = CountingStore(open_store(tiny))
    _, address = start({"tiny": counting.store}, tokens=frozenset({TOKEN, "rotated"}))
    with pytest.raises(AuthenticationError, match="UNAUTHENTICATED"):
        RemoteLoader(address, connection=Connection(timeout=RPC_TIMEOUT))
    with pytest.raises(AuthenticationError):
        RemoteLoader(address, connection=Connection(token="nope", timeout=RPC_TIMEOUT))
    assert counting.reads == 0
    assert np.array_equal(epoch_rows(address, token=TOKEN), np.arange(200))
    assert np.array_equal(epoch_rows(address, token="rotated"), np.arange(200))
    assert counting.reads > 0


# --- the daemon's flags -------------------------------------------------------------------
def test_daemon_with_mutual_tls_and_token_from_flags_and_environment(tmp_path, pki, tiny):
    token_file = tmp_path / "tokens"
    token_file.write_text(f"\n{TOKEN}\n")
    args = [
        "--store",
        str(tiny),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
    ]
    env = {"ANNSERVE_TLS_CLIENT_CA": str(pki.ca), "ANNSERVE_TOKEN_FILE": str(token_file)}
    with Daemon(args, env) as daemon:
        assert "TLS, client certificates required" in daemon.text()
        assert "bearer token required" in daemon.text()
        credentials = {
            "root_certificates": pki.ca.read_bytes(),
            "certificate_chain": pki.client_cert.read_bytes(),
            "private_key": pki.client_key.read_bytes(),
        }
        assert np.array_equal(
            epoch_rows(daemon.address, token=TOKEN, **credentials), np.arange(200)
        )
        with pytest.raises(AuthenticationError):
            RemoteLoader(daemon.address, connection=Connection(timeout=RPC_TIMEOUT, **credentials))
        assert daemon.terminate() == 0


def test_daemon_exits_5_on_unreadable_tls_files(tmp_path, tiny):
    import subprocess

    from ops_support import annserve_command

    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    done = subprocess.run(
        [
            *annserve_command(),
            "--store",
            str(tiny),
            "--port",
            "0",
            "--tls-cert",
            str(not_pem),
            "--tls-key",
            str(not_pem),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 5, done.stderr
    assert "not a PEM file" in done.stderr


def test_healthcheck_command_over_tls(start, pki, tiny, capsys):
    from annserve.server.rpc.healthcheck import main as health_main

    tls = TLSConfig.from_files(pki.server_cert, pki.server_key, pki.ca)
    _, address = start({"tiny": open_store(tiny)}, tls=tls, tokens=frozenset({TOKEN}))
    mutual = [
        "--tls-ca",
        str(pki.ca),
        "--tls-cert",
        str(pki.client_cert),
        "--tls-key",
        str(pki.client_key),
    ]
    assert health_main(["--address", address, *mutual]) == 0  # no token needed
    assert "SERVING" in capsys.readouterr().out
    assert health_main(["--address", address, "--timeout", "1"]) == 1  # plaintext
    assert "UNAVAILABLE" in capsys.readouterr().out
