"""``annserve-health``: ask a daemon's gRPC health service whether it is SERVING.

The container image's ``HEALTHCHECK`` runs it. Exit codes: 0 when the server
answers SERVING, 1 otherwise (NOT_SERVING while draining, unreachable, timed
out, unknown service), 2 for bad arguments. One line goes to stdout either way.

Defaults come from the daemon's own environment variables, so the same
``ANNSERVE_PORT`` configures both: address ``127.0.0.1:$ANNSERVE_PORT`` (or
``$ANNSERVE_HOST`` when that is a specific address rather than a wildcard).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_UNHEALTHY = 1
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}  # noqa: S104 (names the wildcard, binds nothing)


def default_address() -> str:
    """Return ``ANNSERVE_HEALTH_ADDRESS``, else ``ANNSERVE_HOST:ANNSERVE_PORT``.

    A wildcard host (or none) becomes 127.0.0.1; the port defaults to 50051.
    """
    if address := os.environ.get("ANNSERVE_HEALTH_ADDRESS"):
        return address
    host = os.environ.get("ANNSERVE_HOST", "")
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"{host}:{os.environ.get('ANNSERVE_PORT', '50051')}"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``annserve-health``."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="annserve-health",
        description="Exit 0 when an annserve daemon reports SERVING over the gRPC health "
        "protocol, 1 otherwise.",
    )
    parser.add_argument(
        "--address",
        default=default_address(),
        help="host:port or unix:PATH (default %(default)s; env "
        "ANNSERVE_HEALTH_ADDRESS, else from ANNSERVE_HOST/ANNSERVE_PORT)",
    )
    parser.add_argument(
        "--service",
        default=env("ANNSERVE_HEALTH_SERVICE", ""),
        help="service to ask about; empty for the whole server (default)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=env("ANNSERVE_HEALTH_TIMEOUT", "3"),
        metavar="SECONDS",
        help="deadline of the check (default %(default)s)",
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=env("ANNSERVE_HEALTH_TLS_CA"),
        metavar="PEM",
        help="connect over TLS, trusting these CA certificates (env ANNSERVE_HEALTH_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=env("ANNSERVE_HEALTH_TLS_CERT"),
        metavar="PEM",
        help="client certificate chain, for mutual TLS",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=env("ANNSERVE_HEALTH_TLS_KEY"),
        metavar="PEM",
        help="client private key, for mutual TLS",
    )
    parser.add_argument(
        "--tls-server-name",
        default=env("ANNSERVE_HEALTH_TLS_SERVER_NAME"),
        help="name the server certificate must carry, when it differs from the address's host",
    )
    return parser


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> str:
    """Return the server's health status name (``SERVING``, ``NOT_SERVING``...).

    Raises
    ------
    grpc.RpcError
        If the server cannot be reached within ``timeout`` or does not know ``service``.
    """
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    """Check once; return 0 for SERVING, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    credentials = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            parser.error("--tls-cert and --tls-key go together")
        try:
            read = [
                p.read_bytes() if p else None for p in (args.tls_ca, args.tls_key, args.tls_cert)
            ]
        except OSError as e:
            print(f"annserve-health: {e}")
            return EXIT_UNHEALTHY
        credentials = grpc.ssl_channel_credentials(*read)
    try:
        status = check(args.address, args.service, args.timeout, credentials, args.tls_server_name)
    except grpc.RpcError as e:
        print(f"annserve-health: {args.address}: {e.code().name}: {e.details()}")
        return EXIT_UNHEALTHY
    print(f"annserve-health: {args.address}: {status}")
    return EXIT_SERVING if status == "SERVING" else EXIT_UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
