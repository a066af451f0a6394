"""TLS on one side only, or certificates the other side does not trust: a clear error, at once.

The loader raises ``ServerUnavailableError`` (a ``ConnectionError``) saying that the
handshake failed and its likely cause, well before ``Connection.timeout``; a server
that is not there yet is still waited for, up to the timeout.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from annserve.client import Connection, RemoteLoader
from annserve.errors import ServerUnavailableError
from annserve.server import open_store
from annserve.server.rpc.app import build_server
from annserve.server.rpc.security import TLSConfig
from conftest import stop_now
from ops_support import make_pki, write_tiny_store

TIMEOUT = 8.0  # Connection.timeout of the loaders, seconds
FAST = 3.0  # seconds within which a handshake failure must be reported


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("tiny") / "tiny.h5ad")


def connect(address: str, timeout: float = TIMEOUT, **connection: object) -> tuple[float, str]:
    """Build a loader that must fail; return the seconds it took and its message."""
    began = time.monotonic()
    with pytest.raises(ServerUnavailableError) as failed:
        RemoteLoader(address, connection=Connection(timeout=timeout, **connection))
    return time.monotonic() - began, str(failed.value)


# server TLS ("tls", "mutual" or None), client credentials by the names of Pki's files,
# and what the message must say
CASES = {
    "plaintext-client-tls-server": ("tls", {}, "it likely requires TLS"),
    "wrong-ca": (
        "tls",
        {"root_certificates": "rogue_cert"},
        "not signed by a CA in Connection.root_certificates",
    ),
    "tls-client-plaintext-server": (
        None,
        {"root_certificates": "ca"},
        "the server does not use TLS",
    ),
    "no-client-certificate": ("mutual", {"root_certificates": "ca"}, "mutual TLS"),
    "client-certificate-of-another-ca": (
        "mutual",
        {"root_certificates": "ca", "certificate_chain": "rogue_cert", "private_key": "rogue_key"},
        "mutual TLS",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_handshake_failure_names_its_cause_at_once(start, pki, tiny, case):
    server_tls, credentials, cause = CASES[case]
    tls = {
        None: None,
        "tls": TLSConfig.from_files(pki.server_cert, pki.server_key),
        "mutual": TLSConfig.from_files(pki.server_cert, pki.server_key, pki.ca),
    }[server_tls]
    _, address = start({"tiny": open_store(tiny)}, tls=tls)
    connection = {k: getattr(pki, v).read_bytes() for k, v in credentials.items()}
    elapsed, message = connect(address, **connection)
    assert "the handshake failed" in message
    assert cause in message
    assert elapsed < FAST


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nothing_listening_waits_the_timeout_and_says_so():
    elapsed, message = connect(f"127.0.0.1:{free_port()}", timeout=2.0)
    assert "no annserve server answered" in message
    assert "Connection refused" in message
    assert 2.0 <= elapsed < 2.0 + FAST


def test_a_server_starting_while_the_loader_waits_is_found(tiny):
    port = free_port()
    servers = []

    def serve() -> None:
        servers.append(build_server({"tiny": open_store(tiny)}, [f"127.0.0.1:{port}"]))

    starter = threading.Timer(1.0, serve)
    starter.start()
    try:
        loader = RemoteLoader(f"127.0.0.1:{port}", connection=Connection(timeout=TIMEOUT))
        assert loader.n_obs == 200
    finally:
        starter.join(timeout=TIMEOUT)
        for server in servers:
            stop_now(server.server, TIMEOUT)
