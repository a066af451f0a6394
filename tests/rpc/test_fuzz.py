"""Fuzz: >1,000 malformed or hostile requests, each answered with a clear status.

Random field values (huge, negative, unknown enum values, unknown names), raw garbage
bytes, hand-made protobuf with wrong wire types and truncations go to every method of
``annserve.v1.AnnServe`` of one in-process server, while a good client streams whole
epochs throughout. No call may end UNKNOWN or INTERNAL, the server must never stop
answering, and the good client must see every row of every epoch.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annserve.server import open_store
from annserve.server.plan.limits import Limits
from annserve.server.rpc.app import MAX_REQUEST_BYTES, build_server
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import decode_frame
from conftest import stop_now
from ops_support import GoodClient, write_tiny_store

pytestmark = pytest.mark.slow

#: Statuses a hostile request may get: each names what is wrong (or the limit hit).
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
CALL_TIMEOUT = 30.0  # seconds
FRAMES_READ = 3  # frames read from a stream that was accepted, then it is cancelled
N_OBS, N_VARS = 200, 30
GENES = [f"gene{j}" for j in range(N_VARS)]
SETTINGS = {
    "deadline": None,
    "database": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
METHODS = ("StreamBatches", "CountBatches", "DescribeStore")

counts: dict[str, int] = {}
statuses: dict[str, int] = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_tiny_store(tmp_path_factory.mktemp("fuzz") / "tiny.h5ad", N_OBS, N_VARS)
    # a tiny memory budget so that limits are hit too: 10 kB is ~120 rows of this store
    limits = Limits(max_batch_size=4096, stream_memory_mb=0.01)
    started = build_server({"tiny": open_store(path)}, ["127.0.0.1:0"], limits=limits)
    try:
        yield started
    finally:
        stop_now(started.server)


@pytest.fixture(scope="module")
def address(server):
    return f"127.0.0.1:{server.ports[0]}"


@pytest.fixture(scope="module")
def channel(address):
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="module")
def good_client(address):
    client = GoodClient(address, N_OBS, batch_size=32, chunk_size=16, preload_nchunks=4)
    yield client
    client.stop()


def call_raw(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    """Send ``data`` as the request of ``method``; return the final status code."""
    path = f"/annserve.v1.AnnServe/{method}"
    try:
        if method == "StreamBatches":
            call = channel.unary_stream(path)(data, timeout=CALL_TIMEOUT)
            for i, frame in enumerate(call):
                decode_frame(frame)  # well-formed
                if i + 1 == FRAMES_READ:
                    call.cancel()
                    break
        else:
            channel.unary_unary(path)(data, timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    else:
        code, details = grpc.StatusCode.OK, ""
    if code == grpc.StatusCode.CANCELLED and method == "StreamBatches":
        code = grpc.StatusCode.OK  # our own cancel after FRAMES_READ frames
    statuses[code.name] = statuses.get(code.name, 0) + 1
    if code != grpc.StatusCode.OK:
        assert code in CLEAR, f"{method}: {code.name}: {details}"
        assert details, f"{method}: {code.name} without a message"
    return code


def count(kind: str) -> None:
    counts[kind] = counts.get(kind, 0) + 1


# --- strategies ----------------------------------------------------------------------------
SMALL = st.integers(-3, 300)
INT64 = st.one_of(
    SMALL,
    st.sampled_from([-(2**63), -1, 2**31, 2**62, 2**63 - 1]),
    st.integers(-(2**63), 2**63 - 1),
)
UINT64 = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1))
INT32 = st.one_of(st.integers(-3, 30), st.integers(-(2**31), 2**31 - 1))
DOUBLE = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True))
NAMES = st.sampled_from(
    [
        "",
        "tiny",
        "cell_type",
        "n_counts",
        "counts",
        "train",
        "val",
        "test",
        "gene3",
        "../../etc/passwd",
        "/dev/zero",
        "X",
        "obs",
        "\x00",
    ]
)
TEXT = st.one_of(NAMES, st.text(max_size=24))


SCALARS = {
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_FIXED64: UINT64,
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=40),
    FieldDescriptor.TYPE_DOUBLE: DOUBLE,
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
}


def _repeated(field: FieldDescriptor) -> bool:
    is_repeated = getattr(field, "is_repeated", None)
    return (
        is_repeated if is_repeated is not None else (field.label == FieldDescriptor.LABEL_REPEATED)
    )


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def hostile(field: FieldDescriptor, depth: int = 0) -> st.SearchStrategy:
    """Any value of the field's type, most of them senseless (messages: any fields set)."""
    kind = field.type
    if _is_map(field):
        key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
        return st.dictionaries(hostile(key, depth), hostile(value, depth), max_size=6)
    if kind == FieldDescriptor.TYPE_ENUM:
        one = st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), INT32)
    elif kind == FieldDescriptor.TYPE_MESSAGE:
        one = any_message(field.message_type._concrete_class, depth + 1)
    else:
        one = SCALARS[kind]
    return st.lists(one, max_size=6) if _repeated(field) else one


@st.composite
def any_message(draw: st.DrawFn, cls: type, depth: int = 0) -> object:
    """A message of ``cls`` with some fields set to hostile values."""
    message = cls()
    fields = list(cls.DESCRIPTOR.fields)
    if depth > 2 or not fields:
        return message
    for field in draw(st.lists(st.sampled_from(fields), max_size=4, unique_by=lambda f: f.name)):
        assign(message, field, draw(hostile(field, depth)))
    return message


def assign(message: object, field: FieldDescriptor, value: object) -> None:
    """Set a field of ``message`` to ``value`` (a list for repeated fields)."""
    if isinstance(value, dict):
        message.ClearField(field.name)
        target = getattr(message, field.name)
        for key, item in value.items():
            if hasattr(item, "CopyFrom"):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif isinstance(value, list):
        message.ClearField(field.name)
        target = getattr(message, field.name)
        for item in value:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                target.add().CopyFrom(item)
            else:
                target.append(item)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


#: Values a reasonable client sends; fields not listed keep their default.
SENSIBLE = {
    "store": st.sampled_from(["", "tiny"]),
    "batch_size": st.integers(1, 300),
    "chunk_size": st.integers(1, 64),
    "preload_nchunks": st.integers(1, 16),
    "shuffle": st.booleans(),
    "drop_last": st.booleans(),
    "seed": UINT64,
    "epoch": st.integers(0, 10),
    "obs_keys": st.lists(st.sampled_from(["cell_type", "n_counts"]), max_size=2, unique=True),
    "return_index": st.booleans(),
    "encoding": st.sampled_from(list(pb.Encoding.values())),
    "compression": st.sampled_from(list(pb.Compression.values())),
    "var_names": st.lists(st.sampled_from(GENES), max_size=5, unique=True),
    "start_batch": st.integers(0, 5),
}


@st.composite
def stream_requests(draw: st.DrawFn) -> pb.StreamBatchesRequest:
    """A sensible request with 0-4 fields replaced by hostile values."""
    fields = list(pb.StreamBatchesRequest.DESCRIPTOR.fields)
    request = pb.StreamBatchesRequest(
        **{
            name: draw(strategy)
            for name, strategy in SENSIBLE.items()
            if name in pb.StreamBatchesRequest.DESCRIPTOR.fields_by_name
        }
    )
    for field in draw(st.lists(st.sampled_from(fields), max_size=4, unique_by=lambda f: f.name)):
        assign(request, field, draw(hostile(field)))
    return request


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def wire_messages(draw: st.DrawFn) -> bytes:
    """Hand-made protobuf: known and unknown fields with any wire type, maybe truncated."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 6))):
        number = draw(st.one_of(st.integers(1, 30), st.integers(1, 2**29 - 1)))
        wire = draw(st.integers(0, 7))  # 3, 4 (groups), 6, 7 do not exist in proto3
        out += _varint(number << 3 | wire)
        if wire == 0:
            out += _varint(draw(st.integers(0, 2**64 - 1)))
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 2:
            body = draw(st.binary(max_size=40))
            out += _varint(draw(st.one_of(st.just(len(body)), st.integers(0, 2**32)))) + body
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


# --- the fuzz ------------------------------------------------------------------------------
@settings(max_examples=650, **SETTINGS)
@given(request=stream_requests())
def test_stream_requests_get_frames_or_a_clear_status(channel, good_client, request):
    call_raw(channel, "StreamBatches", request.SerializeToString())
    count("StreamBatches")


@settings(max_examples=150, **SETTINGS)
@given(request=stream_requests())
def test_count_requests_get_a_size_or_a_clear_status(channel, good_client, request):
    call_raw(channel, "CountBatches", request.SerializeToString())
    count("CountBatches")


@settings(max_examples=50, **SETTINGS)
@given(store=TEXT)
def test_describe_unknown_stores_is_not_found(channel, good_client, store):
    code = call_raw(
        channel, "DescribeStore", pb.DescribeStoreRequest(store=store).SerializeToString()
    )
    assert (code == grpc.StatusCode.OK) == (store in ("", "tiny"))
    count("DescribeStore")


@settings(max_examples=200, **SETTINGS)
@given(method=st.sampled_from(METHODS), data=st.binary(max_size=300))
def test_raw_garbage_bytes_get_a_clear_status(channel, good_client, method, data):
    call_raw(channel, method, data)
    count("garbage")


@settings(max_examples=200, **SETTINGS)
@given(method=st.sampled_from(METHODS), data=wire_messages())
def test_wrong_wire_types_and_truncations_get_a_clear_status(channel, good_client, method, data):
    call_raw(channel, method, data)
    count("wire")


def test_huge_requests_get_a_clear_status(channel, good_client):
    too_big = pb.StreamBatchesRequest(
        batch_size=8, chunk_size=8, preload_nchunks=2, store="x" * (MAX_REQUEST_BYTES + 1)
    )
    assert (
        call_raw(channel, "StreamBatches", too_big.SerializeToString())
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    many_genes = pb.StreamBatchesRequest(
        batch_size=8, chunk_size=8, preload_nchunks=2, var_names=[f"g{i}" for i in range(200_000)]
    )
    assert (
        call_raw(channel, "StreamBatches", many_genes.SerializeToString())
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    for size in (2**31, 2**62, 2**63 - 1):
        request = pb.StreamBatchesRequest(
            batch_size=size, chunk_size=size, preload_nchunks=size, num_samples=size
        )
        assert call_raw(channel, "StreamBatches", request.SerializeToString()) in CLEAR
    count("huge")


def test_server_served_everyone_throughout(server, good_client):
    total = sum(counts.values())
    print(
        f"\nfuzz: {total} hostile requests {counts}, answered {statuses}; the good client "
        f"meanwhile streamed "
        f"{good_client.epochs} whole epochs ({good_client.rows} rows)"
    )
    good_client.wait_epochs(good_client.epochs + 1)  # still served after all of it
    good_client.stop()
    if len(counts) == 6:  # the whole module ran
        assert total >= 1000
    assert good_client.epochs >= 1
