"""Helpers of the operations tests: small stores, test certificates, daemon subprocesses.

Everything listens on 127.0.0.1 with ephemeral ports; keys are generated per test
session and never written outside pytest's temporary directories.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from annserve.server.rpc.app import build_server
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import decode_frame
from conftest import stop_now

if TYPE_CHECKING:
    from collections.abc import Iterator

    import grpc

START_TIMEOUT = 60.0  # seconds until a daemon logs its address (2 busy cores)
STOP_TIMEOUT = 20.0  # seconds from SIGTERM to exit
RPC_TIMEOUT = 30.0  # seconds
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
STREAM_METHOD = "/annserve.v1.AnnServe/StreamBatches"


def write_tiny_store(path: Path, n_obs: int = 200, n_vars: int = 30, seed: int = 0) -> Path:
    """Write a small CSR h5ad of integer counts with a categorical obs column; return its path."""
    rng = np.random.default_rng(seed)
    x = sp.random(n_obs, n_vars, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    x.data = np.ceil(x.data * 20).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n_obs)),
            "n_counts": np.asarray(x.sum(axis=1)).ravel(),
        },
        index=[f"cell{i}" for i in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)])
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return path


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default), MB."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def stream_call(
    channel: grpc.Channel, timeout: float = RPC_TIMEOUT, metadata=None, **fields
) -> grpc.Call:
    """Open StreamBatches with a request built from ``fields``; frames arrive as bytes."""
    method = channel.unary_stream(
        STREAM_METHOD, request_serializer=pb.StreamBatchesRequest.SerializeToString
    )
    return method(pb.StreamBatchesRequest(**fields), timeout=timeout, metadata=metadata)


def frame_rows(frames: list[bytes]) -> int:
    """Rows carried by ``frames``."""
    return sum(decode_frame(f).header.n_rows for f in frames)


# --- certificates -------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate for 127.0.0.1/localhost, a client one,
    and a client certificate from another CA (which servers must not trust).
    """

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def make_pki(root: Path) -> Pki:
    """Generate the test PKI under ``root`` (EC P-256 keys, valid for one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, issuer: tuple | None, *, ca: bool = False, server: bool = False):
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (name(subject), key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        elif not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256()), key

    def write(stem: str, cert, key) -> tuple[Path, Path]:
        cert_path, key_path = root / f"{stem}.crt", root / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return cert_path, key_path

    root.mkdir(parents=True, exist_ok=True)
    ca = issue("annserve test CA", None, ca=True)
    rogue_ca = issue("rogue CA", None, ca=True)
    ca_path, _ = write("ca", *ca)
    server = write("server", *issue("127.0.0.1", ca, server=True))
    client = write("client", *issue("trainer", ca))
    rogue = write("rogue", *issue("trainer", rogue_ca))
    return Pki(ca_path, *server, *client, *rogue)


# --- daemon subprocesses -------------------------------------------------------------
def annserve_command() -> list[str]:
    """The ``annserve`` console script next to this interpreter, or its module."""
    script = Path(sys.executable).with_name("annserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "annserve.server.rpc.cli"]


class Daemon:
    """An ``annserve`` subprocess on 127.0.0.1 and an ephemeral port; its stderr is collected.

    Parameters
    ----------
    args
        Arguments after ``annserve`` (``--port 0`` and ``--host 127.0.0.1`` are added).
    env
        Extra environment variables.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
        self.proc = subprocess.Popen(
            [*annserve_command(), "--host", "127.0.0.1", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**base, **(env or {})},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        try:
            self.port = int(self.wait_for(LISTENING).group(1))
            self.metrics_port = (
                int(self.wait_for(METRICS).group(1)) if "--metrics-port" in args else None
            )
        except BaseException:
            self.close()
            raise
        self.address = f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Return the first match of ``pattern`` in the log, waiting up to ``timeout`` s."""
        for line in self.log:
            if m := pattern.search(line):
                return m
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.log.append(line)
            if m := pattern.search(line):
                return m
        msg = f"no {pattern.pattern!r} in the daemon log within {timeout} s:\n{self.text()}"
        raise AssertionError(msg)

    def text(self) -> str:
        """The log so far."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.log.append(line)
        return "".join(self.log)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """Send SIGTERM and return the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Kill the daemon if it still runs and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._reader.join(timeout=STOP_TIMEOUT)
        self.proc.stderr.close()

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_daemon(args: list[str], env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """Yield a started daemon, closed afterwards (for fixtures)."""
    daemon = Daemon(args, env)
    try:
        yield daemon
    finally:
        daemon.close()


class GoodClient:
    """A well-behaved trainer streaming whole epochs in a thread until :meth:`stop`.

    Every epoch must bring every row exactly once (checked by index).
    """

    def __init__(self, address: str, n_obs: int, **loader_args: object) -> None:
        from annserve.client import Connection, Output, RemoteLoader

        args = {
            "batch_size": 64,
            "chunk_size": 32,
            "preload_nchunks": 8,
            "output": Output(to_torch=False),
            "return_index": True,
            "connection": Connection(timeout=RPC_TIMEOUT),
            **loader_args,
        }
        self._loader = RemoteLoader(address, **args)
        self._n_obs = n_obs
        self._stop = threading.Event()
        self.epochs = 0
        self.rows = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="good-client", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                seen = np.concatenate([b["index"] for b in self._loader])
                assert np.array_equal(np.sort(seen), np.arange(self._n_obs)), "lost/dup rows"
                self.epochs += 1
                self.rows += len(seen)
        except BaseException as e:  # reported by stop()
            self.errors.append(e)

    def wait_epochs(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` epochs are complete."""
        deadline = time.monotonic() + timeout
        while self.epochs < n and not self.errors and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the current epoch, then stop; raise the first error, if any."""
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "good client did not finish its epoch"
        if self.errors:
            raise self.errors[0]


def write_wide_rows_store(
    path: Path, n_obs: int = 30_000, n_vars: int = 1_000, nnz: int = 300, seed: int = 0
) -> Path:
    """Write a CSR h5ad of ``n_obs`` cells with ``nnz`` distinct genes each (counts 1-49).

    Large enough (~27 MB on the wire) that a stream stalled for seconds cannot have
    read ahead all of it if the server bounds what it buffers.
    """
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_vars, (n_obs, 1))
    indices = np.sort((starts + np.arange(nnz) * (n_vars // nnz)) % n_vars, axis=1)
    x = sp.csr_matrix(
        (
            rng.integers(1, 50, n_obs * nnz).astype(np.float32),
            indices.ravel().astype(np.int32),
            np.arange(0, (n_obs + 1) * nnz, nnz, dtype=np.int64),
        ),
        shape=(n_obs, n_vars),
    )
    ad.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]),
    ).write_h5ad(path)
    return path


class CountingStore:
    """Counts the reads of a store and the rows they return (proof a call never read it)."""

    def __init__(self, store):
        self.reads = 0
        self.rows = 0
        self._read = store.read_rows
        store.read_rows = self._count
        self.store = store

    def _count(self, rows, key="X", pool=None, **options):
        self.reads += 1
        self.rows += len(rows)
        return self._read(rows, key, pool, **options)


@pytest.fixture
def start():
    """Start in-process servers on 127.0.0.1 with ``build_server``; stopped at teardown."""
    servers = []

    def start_server(stores, **kwargs):
        server = build_server(stores, ["127.0.0.1:0"], **kwargs)
        servers.append(server)
        return server, f"127.0.0.1:{server.ports[0]}"

    try:
        yield start_server
    finally:
        for server in servers:
            stop_now(server.server)
