"""A cancelled stream's log line and metrics count the frames it sent (issue 12, item 9).

grpc's sync server resumes a response generator only to ask for the next response
and, on a cancel, stops asking and drops it (Python closes it at its ``yield``).
"""

from __future__ import annotations

import logging
import re
import time

import grpc
import pytest

from annserve.server import open_store
from annserve.server.rpc.service import AnnServeService
from annserve.v1 import annserve_pb2 as pb
from conftest import real_path
from ops_support import frame_rows, stream_call

END = re.compile(r"stream \d+ end: status=(\w+) frames=(\d+) rows=(\d+) bytes=(\d+)")
SERVICE_LOGGER = "annserve.server.rpc.service"


@pytest.fixture(scope="module")
def pbmc():
    return open_store(real_path("pbmc3k"))


def end_line(caplog, timeout: float = 10.0) -> tuple[str, int, int, int]:
    """Status, frames, rows and bytes of the first "stream N end:" line, waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            found = END.match(record.getMessage())
            if found:
                status, *counts = found.groups()
                return status, *map(int, counts)  # type: ignore[return-value]
        time.sleep(0.01)
    pytest.fail("no 'stream N end:' line was logged")


class OpenContext:
    """The parts of ``grpc.ServicerContext`` a stream uses, for a call never cancelled."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        msg = f"aborted: {code} {details}"
        raise AssertionError(msg)

    def add_callback(self, callback) -> bool:
        return True

    def invocation_metadata(self) -> tuple:
        return ()

    def send_initial_metadata(self, metadata) -> None:
        pass

    def peer(self) -> str:
        return "test"

    def is_active(self) -> bool:
        return True


def test_closing_the_generator_counts_every_frame_it_yielded(pbmc, caplog):
    service = AnnServeService({"pbmc": pbmc})
    request = pb.StreamBatchesRequest(batch_size=16, chunk_size=16, preload_nchunks=4)
    with caplog.at_level(logging.INFO, logger=SERVICE_LOGGER):
        frames = service.stream_batches(request, OpenContext())
        received = [next(frames) for _ in range(3)]
        frames.close()  # what dropping it does: GeneratorExit at the yield
    assert end_line(caplog) == ("CANCELLED", 3, frame_rows(received), sum(map(len, received)))
    assert (
        service.metrics.registry.get_sample_value("annserve_frames_total", {"store": "pbmc"}) == 3
    )


@pytest.mark.parametrize(
    ("batch_size", "preload_nchunks", "n_read"),
    [(16, 4, 3), (1024, 16, 2), (1024, 16, 1)],
)
def test_a_client_cancel_is_logged_and_counted_with_the_frames_sent(
    start, pbmc, caplog, batch_size, preload_nchunks, n_read
):
    server, address = start({"pbmc": pbmc})
    fields = {"batch_size": batch_size, "chunk_size": 32, "preload_nchunks": preload_nchunks}
    with (
        caplog.at_level(logging.INFO, logger=SERVICE_LOGGER),
        grpc.insecure_channel(address) as channel,
    ):
        call = stream_call(channel, shuffle=True, **fields)
        received = [next(call) for _ in range(n_read)]
        call.cancel()
        status, frames, rows, nbytes = end_line(caplog)
    assert status == "CANCELLED"
    # the server may have sent more than the client read, never fewer
    assert frames >= len(received)
    assert rows >= frame_rows(received)
    assert nbytes >= sum(map(len, received))
    store = {"store": "pbmc"}
    sample = server.metrics.registry.get_sample_value
    assert sample("annserve_frames_total", store) == frames
    assert sample("annserve_cells_total", store) == rows
    assert sample("annserve_sent_bytes_total", store) == nbytes
    method = {"method": "/annserve.v1.AnnServe/StreamBatches", "code": "CANCELLED"}
    assert sample("annserve_rpc_errors_total", method) == 1
