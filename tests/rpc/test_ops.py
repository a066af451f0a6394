"""Service hygiene: health, reflection, metrics, limits, graceful shutdown, configuration.

In-process servers on 127.0.0.1 and ephemeral ports, each stopped in ``finally``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from annserve.errors import ResourceExhaustedError
from annserve.server import open_store
from annserve.server.plan.limits import Limits
from annserve.server.rpc.app import build_server
from annserve.server.rpc.cli import build_parser, env_var, main
from annserve.server.rpc.metrics import serve_metrics
from annserve.server.rpc.security import is_loopback
from annserve.server.rpc.service import SERVICE_NAME
from conftest import real_path
from ops_support import (
    RPC_TIMEOUT,
    GoodClient,
    frame_rows,
    stream_call,
    write_tiny_store,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pbmc():
    return open_store(real_path("pbmc3k"))


def address_of(server) -> str:
    return f"127.0.0.1:{server.ports[0]}"


def health_status(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def slowly(frames, pause: float) -> int:
    """Consume ``frames`` one per ``pause`` seconds; return how many."""
    n = 0
    for _ in frames:
        time.sleep(pause)
        n += 1
    return n


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --- health and graceful shutdown ------------------------------------------------------
def test_health_serving_then_not_serving_while_draining(start, pbmc):
    server, _ = start({"pbmc": pbmc})
    address = address_of(server)
    assert health_status(address) == "SERVING"
    assert health_status(address, SERVICE_NAME) == "SERVING"
    with grpc.insecure_channel(address) as channel:
        stream = stream_call(
            channel, batch_size=16, chunk_size=16, preload_nchunks=4, shuffle=True, seed=3
        )
        frames = [next(stream)]  # a stream in flight, paused
        result = {}
        stopper = threading.Thread(target=lambda: result.update(done=server.shutdown(30)))
        stopper.start()
        deadline = time.monotonic() + 10
        while health_status(address) == "SERVING":
            assert time.monotonic() < deadline, "health still SERVING 10 s into the drain"
            time.sleep(0.01)
        assert health_status(address) == "NOT_SERVING"
        assert health_status(address, SERVICE_NAME) == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as refused:
            next(stream_call(channel, batch_size=16, chunk_size=16, preload_nchunks=4))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        frames += list(stream)  # the in-flight stream finishes: nothing lost
    stopper.join(30)
    assert result == {"done": True}
    assert frame_rows(frames) == pbmc.n_obs


def test_stream_id_in_initial_metadata_and_request_id_in_the_log(start, pbmc, caplog):
    server, _ = start({"pbmc": pbmc})
    with (
        caplog.at_level(logging.INFO, logger="annserve.server.rpc.service"),
        grpc.insecure_channel(address_of(server)) as channel,
    ):
        call = stream_call(
            channel,
            metadata=(("x-request-id", "job-42"),),
            batch_size=1024,
            chunk_size=32,
            preload_nchunks=8,
        )
        frames = list(call)
        stream_id = dict(call.initial_metadata())["annserve-stream-id"]
    assert frame_rows(frames) == pbmc.n_obs
    start_line = next(r for r in caplog.records if "start:" in r.getMessage())
    assert start_line.getMessage().startswith(f"stream {stream_id} start:")
    assert "request_id=job-42" in start_line.getMessage()
    assert start_line.stream_id == int(stream_id)


def test_streams_past_the_grace_end_with_unavailable_naming_the_shutdown(start, pbmc):
    server, _ = start({"pbmc": pbmc})
    with grpc.insecure_channel(address_of(server)) as channel:
        stream = stream_call(channel, batch_size=16, chunk_size=16, preload_nchunks=4)
        next(stream)
        result = {}

        def stop() -> None:
            began = time.monotonic()
            result["done"] = server.shutdown(0.5)
            result["took"] = time.monotonic() - began

        stopper = threading.Thread(target=stop)
        stopper.start()
        with pytest.raises(grpc.RpcError) as ended:
            slowly(stream, 0.02)  # a slow trainer: 169 frames would take > 3 s
        stopper.join(10)
    print(
        f"\nshutdown(grace=0.5) took {result['took']:.2f} s; the stream ended with "
        f"{ended.value.code().name}: {ended.value.details()}"
    )
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    # ours at the stream's next frame; grpc's when a send stays blocked on the slow
    # reader through the 1 s slack and the server cancels the call
    assert re.search("annserve is shutting down|Cancelling all calls", ended.value.details())
    assert result["done"] is False
    assert result["took"] < 0.5 + 1.0 + 0.5


# --- reflection ------------------------------------------------------------------------
def test_reflection_lists_and_describes_the_service(start, pbmc):
    server, _ = start({"pbmc": pbmc})
    with grpc.insecure_channel(address_of(server)) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert SERVICE_NAME in services
        assert "grpc.health.v1.Health" in services
        methods = DescriptorPool(database).FindServiceByName(SERVICE_NAME).methods_by_name
        assert {"DescribeStore", "StreamBatches"} <= set(methods)
        assert methods["StreamBatches"].output_type.full_name == "annserve.v1.BatchFrame"


# --- metrics ---------------------------------------------------------------------------
def test_metrics_endpoint_counts_a_stream_and_errors(start, pbmc):
    from annserve.client import Connection, Output, RemoteLoader

    server, _ = start({"pbmc": pbmc})
    endpoint = serve_metrics(server.metrics, "127.0.0.1", 0)
    try:
        loader = RemoteLoader(
            address_of(server),
            batch_size=1000,
            output=Output(to_torch=False),
            connection=Connection(timeout=RPC_TIMEOUT),
        )
        n_batches = sum(1 for _ in loader)
        with grpc.insecure_channel(address_of(server)) as channel, pytest.raises(grpc.RpcError):
            next(stream_call(channel, batch_size=-1))
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        endpoint.close()
    samples = metric_samples(text)
    store = (("store", "pbmc"),)
    assert samples[("annserve_cells_total", store)] == pbmc.n_obs
    assert samples[("annserve_batches_total", store)] == n_batches == 3
    assert samples[("annserve_frames_total", store)] >= n_batches
    assert samples[("annserve_sent_bytes_total", store)] > pbmc.n_obs * 100
    assert samples[("annserve_streams_total", store)] == 1
    assert samples[("annserve_active_streams", ())] == 0
    assert samples[("annserve_frames_queued", ())] == 0
    assert samples[("annserve_store_read_seconds_count", store)] >= 1
    assert samples[("annserve_stream_duration_seconds_count", ())] == 2  # incl. the refused one
    errors = {
        dict(labels)["code"]: v
        for (name, labels), v in samples.items()
        if name == "annserve_rpc_errors_total"
    }
    assert errors == {"INVALID_ARGUMENT": 1}


# --- limits ----------------------------------------------------------------------------
LIMITED = Limits(max_streams=8, max_batch_size=1024, max_message_bytes=1 << 20, stream_memory_mb=5)


@pytest.mark.parametrize(
    ("limit", "request_fields"),
    [
        ("max_batch_size", {"batch_size": 2048, "chunk_size": 32, "preload_nchunks": 8}),
        # 2,700 rows x ~6.8 kB per row once read: ~18 MB > 5 MB
        ("stream_memory_mb", {"batch_size": 64, "chunk_size": 32, "preload_nchunks": 256}),
        # frames of ~2 MB (up to 1,024 rows) > 1 MiB
        ("max_message_bytes", {"batch_size": 1024, "chunk_size": 32, "preload_nchunks": 16}),
    ],
)
def test_each_limit_gives_resource_exhausted_naming_it_while_a_good_client_streams(
    start, pbmc, limit, request_fields
):
    server, _ = start({"pbmc": pbmc}, limits=LIMITED)
    good = GoodClient(address_of(server), pbmc.n_obs)  # batches of 64 rows: frames ~200 kB
    try:
        for _ in range(3):
            with (
                grpc.insecure_channel(address_of(server)) as channel,
                pytest.raises(grpc.RpcError) as refused,
            ):
                list(stream_call(channel, **request_fields))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.details().startswith(f"{limit}:"), refused.value.details()
            assert "--" + limit.replace("_", "-") in refused.value.details()
        good.wait_epochs(2)
    finally:
        good.stop()
    assert good.epochs >= 2


def test_max_streams_gives_resource_exhausted_and_frees_the_slot(start, pbmc):
    from annserve.client import Connection, Output, RemoteLoader

    server, _ = start({"pbmc": pbmc}, limits=Limits(max_streams=3))
    address = address_of(server)
    with grpc.insecure_channel(address) as channel:
        held = [
            stream_call(channel, batch_size=16, chunk_size=16, preload_nchunks=4) for _ in range(3)
        ]
        for call in held:
            next(call)
        with pytest.raises(grpc.RpcError) as refused:
            next(stream_call(channel, batch_size=16, chunk_size=16, preload_nchunks=4))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.value.details().startswith("max_streams: 3 streams are open")
        loader = RemoteLoader(
            address,
            batch_size=256,
            output=Output(to_torch=False),
            connection=Connection(timeout=RPC_TIMEOUT),
        )
        with pytest.raises(ResourceExhaustedError, match="max_streams"):
            next(iter(loader))
        assert frame_rows([next(held[0]), *held[0]]) == pbmc.n_obs - 16  # a held one completes
        deadline = time.monotonic() + 5
        while server.service.open_streams() > 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert sum(len(b["X"].indptr) - 1 for b in loader) == pbmc.n_obs  # slot reused
        for call in held[1:]:
            call.cancel()


def test_a_busy_port_cannot_be_bound_twice(start, pbmc):
    server, _ = start({"pbmc": pbmc})
    with pytest.raises(OSError, match="cannot bind"):  # the daemon exits 4 on it
        build_server({"pbmc": pbmc}, [address_of(server)])


def test_limits_reject_nonsense_values():
    with pytest.raises(ValueError, match="max_streams"):
        Limits(max_streams=0)
    with pytest.raises(ValueError, match="max_message_bytes"):
        Limits(max_message_bytes=100)


# --- configuration ---------------------------------------------------------------------
def daemon_flags() -> list[str]:
    return [
        a.option_strings[-1]
        for a in build_parser()._actions
        if a.option_strings and a.option_strings[-1] != "--help"
    ]


def test_every_flag_reads_an_environment_variable(monkeypatch):
    monkeypatch.setenv("ANNSERVE_PORT", "6001")
    monkeypatch.setenv("ANNSERVE_MAX_STREAMS", "7")
    monkeypatch.setenv("ANNSERVE_LOG_FORMAT", "json")
    monkeypatch.setenv("ANNSERVE_STREAM_MEMORY_MB", "12.5")
    args = build_parser().parse_args(["--store", "a.h5ad", "--max-streams", "9"])
    assert args.port == 6001
    assert args.max_streams == 9  # a flag beats its variable
    assert args.log_format == "json"
    assert args.stream_memory_mb == 12.5
    monkeypatch.setenv("ANNSERVE_PORT", "not-a-port")
    with pytest.raises(SystemExit) as bad:
        build_parser().parse_args(["--store", "a.h5ad"])
    assert bad.value.code == 2


def test_readme_documents_every_flag_with_its_variable():
    readme = (ROOT / "README.md").read_text()
    for flag in daemon_flags():
        row = re.search(rf"^\|[^\n]*`{re.escape(flag)}[ `][^\n]*$", readme, re.MULTILINE)
        assert row, f"README has no table row for {flag}"
        assert f"`{env_var(flag)}`" in row.group(0), f"README row of {flag} lacks {env_var(flag)}"


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_store_from_the_environment_and_exit_codes(tmp_path, monkeypatch, capsys, restore_logging):
    store = write_tiny_store(tmp_path / "tiny.h5ad")
    monkeypatch.setenv("ANNSERVE_STORE", f"tiny={store}")
    monkeypatch.setenv("ANNSERVE_TOKEN_FILE", str(tmp_path / "missing-token"))
    assert main([]) == 5  # unreadable token file
    assert "missing-token" in capsys.readouterr().err
    monkeypatch.delenv("ANNSERVE_TOKEN_FILE")
    with pytest.raises(SystemExit) as bad:
        main(["--max-message-bytes", "10"])
    assert bad.value.code == 2
    with pytest.raises(SystemExit) as bad:
        main(["--tls-cert", str(store)])  # without --tls-key
    assert bad.value.code == 2
    monkeypatch.delenv("ANNSERVE_STORE")
    with pytest.raises(SystemExit) as bad:
        main([])
    assert bad.value.code == 2
    assert "ANNSERVE_STORE" in capsys.readouterr().err


def test_non_loopback_bind_without_tls_or_token_warns(
    tmp_path, monkeypatch, caplog, restore_logging
):
    import annserve.server.rpc.cli as cli

    def refuse(*args, **kwargs):  # nothing is bound: the warning comes first
        msg = "not binding in tests"
        raise OSError(msg)

    monkeypatch.setattr(cli, "build_server", refuse)
    store = write_tiny_store(tmp_path / "tiny.h5ad")
    assert main(["--store", str(store), "--host", "0.0.0.0", "--port", "0"]) == 4
    assert "without TLS or a token" in caplog.text
    caplog.clear()
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert (
        main(
            ["--store", str(store), "--host", "0.0.0.0", "--port", "0", "--token-file", str(token)]
        )
        == 4
    )
    assert "without TLS or a token" not in caplog.text


def test_is_loopback():
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("::")
    assert not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")
