"""Receiver CPU per MiB: a grpcio server stream against a plain TCP socket (loopback).

What the TCP trainer's floor is: every byte of a frame passes through grpcio's
receive before annserve's client sees it. A sender in this process streams
``--messages`` messages of ``--message-mib`` MiB of random bytes; a receiver in a fresh
process takes them and prints its own CPU (user + system) per MiB and its MB/s. Rows:

* ``grpc`` — a unary-stream call, bytes in and out (no serializers), with the
  channel options of ``--grpc-options`` variants (the server gets the same options);
* ``socket`` — ``recv_into`` a preallocated buffer, the kernel's copy only.

Rows are interleaved over ``--reps`` repetitions; medians are printed.

    python benchmarks/bench_receive.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
from concurrent import futures

import grpc

#: Channel (and server) options of each grpc row.
GRPC_VARIANTS: dict[str, list[tuple[str, int]]] = {
    "grpc default": [],
    "grpc max_frame_size 16M": [("grpc.http2.max_frame_size", (16 << 20) - 1)],
    "grpc read chunk 4M": [("grpc.experimental.tcp_read_chunk_size", 4 << 20)],
}
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]

#: A receiver's body: ``received()`` yields the byte count of each read; the script
#: around it times them (wall and its own CPU) and prints JSON.
_TIMED = """
import json, resource, sys, time
{setup}
start, r0, n = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF), 0
for k in received():
    n += k
wall, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(json.dumps({{"bytes": n, "wall": wall, "cpu": cpu}}))
"""
_GRPC_RECEIVER = _TIMED.format(
    setup="""
import grpc
address, options = sys.argv[1], [tuple(o) for o in json.loads(sys.argv[2])]
channel = grpc.insecure_channel(address, options=options)
def received():
    for message in channel.unary_stream("/bench.Receive/Stream")(b""):
        yield len(message)
"""
)
_SOCKET_RECEIVER = _TIMED.format(
    setup="""
import socket
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buffer = memoryview(bytearray(size))
conn = socket.create_connection((host, port))
def received():
    while k := conn.recv_into(buffer):
        yield k
"""
)


def _receive(code: str, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def grpc_row(options: list[tuple[str, int]], payload: bytes, messages: int) -> dict[str, float]:
    """Stream ``messages`` copies of ``payload`` to a fresh grpcio receiver."""

    def stream(request: bytes, context: grpc.ServicerContext):
        for _ in range(messages):
            yield payload

    handler = grpc.method_handlers_generic_handler(
        "bench.Receive", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(2), options=_UNLIMITED + options)
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        return _receive(_GRPC_RECEIVER, f"127.0.0.1:{port}", json.dumps(_UNLIMITED + options))
    finally:
        server.stop(0).wait(10)


def socket_row(payload: bytes, messages: int) -> dict[str, float]:
    """Send ``messages`` copies of ``payload`` over one TCP connection to a fresh receiver."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def send() -> None:
            conn, _ = listener.accept()
            with conn:
                for _ in range(messages):
                    conn.sendall(payload)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        port = listener.getsockname()[1]
        row = _receive(_SOCKET_RECEIVER, "127.0.0.1", str(port), str(len(payload)))
        sender.join(30)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--message-mib", type=float, default=2.0, help="MiB per message")
    parser.add_argument("--messages", type=int, default=200, help="messages per repetition")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    args = parser.parse_args(argv)
    payload = os.urandom(int(args.message_mib * (1 << 20)))
    rows: dict[str, list[dict[str, float]]] = {}
    for rep in range(args.reps):
        for name, options in GRPC_VARIANTS.items():
            rows.setdefault(name, []).append(grpc_row(options, payload, args.messages))
        rows.setdefault("socket recv_into", []).append(socket_row(payload, args.messages))
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
    mib = len(payload) * args.messages / (1 << 20)
    print(
        f"{args.messages} messages of {args.message_mib:g} MiB over 127.0.0.1, receiver in its "
        f"own process, medians of {args.reps} interleaved repetitions, grpcio {grpc.__version__}"
    )
    print("| receiver | CPU ms/MiB | MB/s |")
    print("|---|--:|--:|")
    for name, runs in rows.items():
        assert all(r["bytes"] == len(payload) * args.messages for r in runs), name
        cpu = statistics.median(r["cpu"] / mib * 1e3 for r in runs)
        speed = statistics.median(r["bytes"] / r["wall"] / 1e6 for r in runs)
        print(f"| {name} | {cpu:.3f} | {speed:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
