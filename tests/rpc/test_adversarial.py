"""Hostile sizes and values are refused before any work, naming the field (issue 13, 6-10).

Each request goes to a real server on 127.0.0.1; every call has a deadline.
"""

from __future__ import annotations

import math
import threading
import time

import anndata as ad
import grpc
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from annserve.server import open_store
from annserve.server.plan.epoch import Span, rows_in_spans
from annserve.server.plan.limits import Limits
from annserve.server.plan.sampler import ChunkLayout, ChunkSampler
from annserve.server.stream.frames import TARGET_FRAME_BYTES
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import decode_frame
from conftest import raw_stream, real_path

TIMEOUT = 20.0
BASE = {"batch_size": 64, "chunk_size": 16, "preload_nchunks": 4}
WEIGHTED = {"sampler": pb.SAMPLER_WEIGHTED, "balance_by": "patient"}


def _refused(address: str, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        raw_stream(address, TIMEOUT, **{**BASE, **fields})
    return caught.value


@pytest.fixture(scope="module")
def wu2020():
    """The 200-cell real dataset with categorical obs (patient, sample, ...)."""
    return open_store(real_path("wu2020"))


@pytest.fixture
def tight(start, wu2020):
    """A server with a 100 MB per-stream budget."""
    _, address = start({"wu": wu2020}, limits=Limits(stream_memory_mb=100))
    return address


# --- 6: work stops when the client is gone; shard counts bounded by rows -----------
def test_more_shards_than_rows_is_refused_at_once(tight):
    started = time.process_time()
    error = _refused(tight, shard_count=2**62, shard_index=2**62 - 1)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shard_count" in error.details()
    assert time.process_time() - started < 5  # before: 19 CPU-s in 20 s, status OK


class _Counting(ChunkSampler):
    """A chunk sampler that counts the preload buffers it generates."""

    generated = 0

    def preloads(self, epoch):
        for rows in super().preloads(epoch):
            self.generated += 1
            yield rows


def test_a_padded_span_far_ahead_skips_whole_laps():
    sampler = _Counting(ChunkLayout(np.array([0, 1000]), 10), 2, shuffle=True, seed=0)
    start = 10**12 * sampler.n_rows + 5  # a shard far past the epoch's rows (padding)
    rows = np.concatenate(list(rows_in_spans(sampler, 0, (Span(start, start + 50),))))
    assert len(rows) == 50
    assert sampler.generated <= 2 * (100 // 2)  # at most two laps of 50 buffers


def test_skipping_ahead_stops_once_the_stream_is_cancelled():
    sampler = _Counting(ChunkLayout(np.array([0, 10_000]), 1), 1, shuffle=True, seed=0)
    cancelled = threading.Event()
    pieces = rows_in_spans(sampler, 0, (Span(9_990, 10_000),), cancelled)
    cancelled.set()  # the client left before the first piece
    assert list(pieces) == []
    assert sampler.generated <= 1  # before: all 9,990 buffers before the span


# --- 7: sizes checked against the budget before allocation ---------------------------
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({**WEIGHTED, "num_samples": 2**40}, "num_samples"),  # before: 256 GiB, INTERNAL
        ({**WEIGHTED, "num_samples": 2**26, "chunk_size": 1}, "num_samples"),  # +1 GB
        # drawn with replacement, a buffer's rows are not bounded by the store's
        (
            {**WEIGHTED, "num_samples": 2**21, "chunk_size": 2**21, "preload_nchunks": 16},
            "stream_memory_mb",
        ),
    ],
    ids=["num_samples-2^40", "num_samples-2^26", "drawn-chunk-2^21x16"],
)
def test_oversized_requests_are_refused_naming_the_field(tight, fields, named):
    error = _refused(tight, **fields)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert named in error.details()


@pytest.mark.parametrize(
    "fields", [{"chunk_size": 2**21, "preload_nchunks": 16}, {"chunk_size": 2**32}]
)
def test_weighted_draws_stop_at_num_samples(tight, wu2020, fields):
    """Before: every draw took chunk_size rows, then the epoch cut them (RSS 139 -> 925 MB)."""
    frames = raw_stream(tight, TIMEOUT, **{**BASE, **WEIGHTED, **fields})
    assert sum(decode_frame(f).header.n_rows for f in frames) == wu2020.n_obs


@pytest.mark.parametrize("chunk_size", [2**32, 2**62, 2**63 - 1])
def test_a_chunk_larger_than_the_store_is_the_whole_store(tight, wu2020, chunk_size):
    frames = raw_stream(tight, TIMEOUT, **{**BASE, "chunk_size": chunk_size, "return_index": True})
    index = np.concatenate([decode_frame(f).arrays["index"] for f in frames])
    assert sorted(index.tolist()) == list(range(wu2020.n_obs))


# --- 8: non-finite weights and fractions ---------------------------------------------
@pytest.mark.parametrize(
    "fields",
    [
        {**WEIGHTED, "category_weights": {"Colon1": math.nan}},
        {**WEIGHTED, "category_weights": {"Colon1": math.inf}},
        {"split": "train", "split_fractions": [math.nan, math.nan]},
        {"split": "test", "split_fractions": [math.nan, 0.5, 0.5]},
        {"split": "train", "split_fractions": [math.inf, -math.inf]},
    ],
    ids=["weight-nan", "weight-inf", "fractions-nan", "fractions-nan-3", "fractions-inf"],
)
def test_non_finite_values_are_invalid(tight, fields):
    error = _refused(tight, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(f for f in fields if f in ("category_weights", "split_fractions"))) in (
        error.details()
    )


# --- 9: client values are quoted, not echoed ----------------------------------------
@pytest.mark.parametrize("field", ["store", "layer", "obs_keys", "var_names", "split"])
def test_a_huge_name_is_quoted_to_100_characters(tight, field):
    name = "x" * (1 << 20)  # 1 MiB (the request stays under gRPC's 4 MiB default)
    value = [name] if field in ("obs_keys", "var_names") else name
    error = _refused(tight, **{"store": "wu", field: value})
    assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    assert field.rstrip("s") in error.details() or field in error.details()
    assert len(error.details()) < 1_000  # before: the whole name, then "metadata too large"


# --- 10: duplicates; frames sized by all their bytes ---------------------------------
def test_duplicate_obs_keys_are_invalid(tight):
    error = _refused(tight, obs_keys=["patient"] * 1000)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "obs_keys" in error.details()
    assert len(error.details()) < 1_000


def test_frames_are_sized_by_their_obs_bytes(tmp_path, start):
    n = 400
    rng = np.random.default_rng(0)
    notes = ["".join(rng.choice(list("ACGT"), 20_000)) for _ in range(n)]  # 20 kB per row
    path = tmp_path / "wide_obs.h5ad"
    ad.AnnData(
        X=sp.random(n, 50, density=0.1, format="csr", dtype=np.float32, random_state=0),
        obs=pd.DataFrame({"note": notes}, index=[f"c{i}" for i in range(n)]),
    ).write_h5ad(path)
    _, address = start({"wide": open_store(path)})
    fields = {"batch_size": 400, "chunk_size": 100, "preload_nchunks": 4, "obs_keys": ["note"]}
    frames = raw_stream(address, TIMEOUT, **fields)
    # before: one 8 MB frame of 400 rows (sized by X's 20 bytes per row alone)
    assert max(len(f) for f in frames) <= 2 * TARGET_FRAME_BYTES
