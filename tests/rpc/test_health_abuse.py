"""Health calls need no token: Watch streams held open by anyone must starve nothing.

Each ``Health.Watch`` here has its own channel, as a flood from many clients would.
In-process servers on 127.0.0.1 and ephemeral ports.
"""

from __future__ import annotations

import contextlib
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from annserve.server import open_store
from annserve.server.rpc.security import MAX_UNAUTHENTICATED_CALLS
from annserve.v1 import annserve_pb2 as pb
from ops_support import frame_rows, stream_call, write_tiny_store

if TYPE_CHECKING:
    from collections.abc import Iterator

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
N_WATCHES = 100
SHORT = 5.0  # seconds: deadline of the calls that must still be served
SETTLE = 20.0  # seconds for every watch to get its first answer (2 busy cores)
SERVING = "SERVING"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.name
WATCH = "/grpc.health.v1.Health/Watch"
CHURNERS = 8  # threads opening and closing Watch streams
CHURN_SECONDS = 5.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("tiny") / "tiny.h5ad")


@contextmanager
def held_watches(address: str, n: int) -> Iterator[list[grpc.Call]]:
    """Open ``n`` Health.Watch calls, one channel each; cancelled and closed on exit."""
    channels = [grpc.insecure_channel(address) for _ in range(n)]
    calls = [
        health_pb2_grpc.HealthStub(c).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        for c in channels
    ]
    try:
        yield calls
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()


def first_answers(calls: list[grpc.Call], timeout: float = SETTLE) -> list[str]:
    """Status name of each watch's first response, or the code it ended with.

    Gives up after ``timeout`` seconds: the list is shorter when some never answered.
    """
    answers: list[str] = []

    def read() -> None:
        for call in calls:
            try:
                status = next(call).status
                answers.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as e:
                answers.append(e.code().name)

    reader = threading.Thread(target=read, name="watch-reader", daemon=True)
    reader.start()
    reader.join(timeout)
    return list(answers)


def check(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=SHORT
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def describe(address: str) -> pb.StoreInfo:
    with grpc.insecure_channel(address) as channel:
        method = channel.unary_unary(
            "/annserve.v1.AnnServe/DescribeStore",
            request_serializer=pb.DescribeStoreRequest.SerializeToString,
            response_deserializer=pb.StoreInfo.FromString,
        )
        return method(pb.DescribeStoreRequest(), timeout=SHORT, metadata=AUTH)


def streamed_rows(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        frames = list(
            stream_call(channel, SHORT, AUTH, batch_size=64, chunk_size=32, preload_nchunks=4)
        )
    return frame_rows(frames)


def test_held_watches_leave_checks_and_trainers_served(start, tiny):
    _, address = start({"tiny": open_store(tiny)}, tokens=frozenset([TOKEN]))
    with held_watches(address, N_WATCHES) as calls:
        answers = first_answers(calls)
        assert check(address) == SERVING
        assert describe(address).n_obs == 200
        assert streamed_rows(address) == 200
        # the first MAX_UNAUTHENTICATED_CALLS watches are served, the rest refused at once
        assert len(answers) == N_WATCHES
        assert answers.count(SERVING) == MAX_UNAUTHENTICATED_CALLS
        assert answers.count(EXHAUSTED) == N_WATCHES - MAX_UNAUTHENTICATED_CALLS


def test_watches_hold_no_worker_thread(start, tiny):
    # a pool of 2 threads and 10 watches: a watch holding its thread would starve the rest
    _, address = start({"tiny": open_store(tiny)}, tokens=frozenset([TOKEN]), max_workers=2)
    with held_watches(address, 10) as calls:
        answers = first_answers(calls)
        assert check(address) == SERVING
        assert describe(address).n_obs == 200
        assert answers == [SERVING] * 10


def test_a_watch_follows_the_status_and_frees_its_slot(start, tiny):
    server, address = start({"tiny": open_store(tiny)}, max_unauthenticated_calls=2)
    with held_watches(address, 3) as calls:
        answers = first_answers(calls)
        assert sorted(answers) == [EXHAUSTED, SERVING, SERVING]
        served = calls[answers.index(SERVING)]
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert next(served).status == health_pb2.HealthCheckResponse.NOT_SERVING
        server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    # the cancelled watches give their slots back once the server sees them end
    deadline = time.monotonic() + SETTLE
    while True:
        with held_watches(address, 2) as calls:
            if first_answers(calls) == [SERVING, SERVING]:
                break
        assert time.monotonic() < deadline, "cancelled watches still hold their slots"
        time.sleep(0.1)
    errors = server.metrics.registry.get_sample_value
    name = "annserve_rpc_errors_total"
    assert errors(name, {"method": WATCH, "code": EXHAUSTED}) >= 1
    assert errors(name, {"method": WATCH, "code": grpc.StatusCode.CANCELLED.name}) >= 2


def test_the_limit_is_positive(start, tiny):
    with pytest.raises(ValueError, match="at least 1"):
        start({"tiny": open_store(tiny)}, max_unauthenticated_calls=0)


def test_watches_opened_and_closed_at_once_leave_the_server_serving(start, tiny):
    """Watch streams that open while others close must not wedge the server.

    grpc runs a closing stream's callback on its one completion-queue thread, and
    grpc_health's took the servicer's lock there while an opening Watch held it during
    its first send: the server answered nothing after this churn (3 of 3 runs of 5 s).
    """
    _, address = start({"tiny": open_store(tiny)})
    until = time.monotonic() + CHURN_SECONDS

    def churn() -> None:
        while time.monotonic() < until:
            with grpc.insecure_channel(address) as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(), timeout=SHORT
                )
                with contextlib.suppress(grpc.RpcError):  # a stalled server shows below
                    next(watch)

    threads = [threading.Thread(target=churn, daemon=True) for _ in range(CHURNERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CHURN_SECONDS + 2 * SHORT)
    assert check(address) == SERVING
    assert streamed_rows(address) == 200
