"""Transport security (TLS, mutual TLS) and bearer-token authentication of the server."""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from annserve.errors import AuthenticationError, ResourceExhaustedError
from annserve.server.rpc.handlers import rebuild_handler
from annserve.server.rpc.service import status_of

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

logger = logging.getLogger(__name__)

#: Methods any caller may use without a token: liveness probes carry no secrets.
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)
#: Calls of each of those methods in flight at once; more get ``RESOURCE_EXHAUSTED``.
#: A probe (kubelet, Docker's HEALTHCHECK, a load balancer) takes one call at a time; a
#: health ``Watch`` stays open while its client watches, so unbounded, any caller could
#: open them by the thousand.
MAX_UNAUTHENTICATED_CALLS = 64


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Server-side TLS material, PEM bytes.

    Attributes
    ----------
    certificate_chain
        The server's certificate chain.
    private_key
        Its private key.
    client_ca
        CA certificates that client certificates must chain to; when set, every
        TCP client must present one (mutual TLS). None: any client may connect.
    """

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    @classmethod
    def from_files(cls, cert: Path, key: Path, client_ca: Path | None = None) -> TLSConfig:
        """Read PEM files.

        Raises
        ------
        OSError
            If a file cannot be read.
        ValueError
            If a file is empty or not PEM.
        """
        parts = [p.read_bytes() if p is not None else None for p in (cert, key, client_ca)]
        for path, data in zip((cert, key, client_ca), parts, strict=True):
            if data is not None and b"-----BEGIN" not in data:
                msg = f"{path}: not a PEM file"
                raise ValueError(msg)
        return cls(parts[0], parts[1], parts[2])  # type: ignore[arg-type]

    def credentials(self) -> grpc.ServerCredentials:
        """Return grpc server credentials (client certificates required with ``client_ca``)."""
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def read_tokens(path: Path) -> frozenset[str]:
    """Read the accepted bearer tokens: each non-empty line of ``path`` is one.

    Several lines let a token be rotated without a restart of the clients at once.

    Raises
    ------
    OSError
        If the file cannot be read.
    ValueError
        If it holds no token.
    """
    tokens = frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not tokens:
        msg = f"{path}: no token in the token file"
        raise ValueError(msg)
    return tokens


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <token>`` metadata naming a known token.

    The check runs before the method's handler, so a rejected call never reaches
    the servicer (and never reads a store). Health checks are exempt.

    Parameters
    ----------
    tokens
        Accepted tokens.
    """

    def __init__(self, tokens: frozenset[str]) -> None:
        if not tokens:
            msg = "at least one token is required"
            raise ValueError(msg)
        self._tokens = [t.encode() for t in tokens]

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        values = [v for k, v in metadata or () if k == "authorization"]
        if len(values) != 1:
            return False
        value = values[0] if isinstance(values[0], bytes) else values[0].encode()
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # compare against every token, so timing tells nothing about which one is close
        return any([hmac.compare_digest(token.strip(), t) for t in self._tokens])  # noqa: C419

    def intercept_service(
        self, continuation: Callable, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """Continue to the handler when authorized; otherwise a handler that aborts."""
        if details.method.startswith(UNAUTHENTICATED_METHODS) or self._authorized(
            details.invocation_metadata
        ):
            return continuation(details)
        handler = continuation(details)  # only looks the method up: nothing runs
        if handler is None:
            return None
        deny = _denial(details.method)
        return rebuild_handler(handler, lambda _behavior: deny)


class UnauthenticatedCallLimit(grpc.ServerInterceptor):
    """Refuse calls to a token-exempt method beyond ``limit`` in flight at once.

    Each method counts apart, so ``Watch`` streams held open never crowd out ``Check``
    probes; calls needing a token are not counted (what they may do is bounded once
    authenticated). A call counts from when its handler starts until it terminates;
    refused calls end with ``RESOURCE_EXHAUSTED``.

    Parameters
    ----------
    limit
        Calls of each method of :data:`UNAUTHENTICATED_METHODS` in flight at once.
    """

    def __init__(self, limit: int = MAX_UNAUTHENTICATED_CALLS) -> None:
        if limit < 1:
            msg = f"limit: {limit} unauthenticated calls; need at least 1"
            raise ValueError(msg)
        self._limit = limit
        self._open: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def intercept_service(
        self, continuation: Callable, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        """Bound the calls of a token-exempt method; continue others unchanged."""
        handler = continuation(details)
        if handler is None or not details.method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        return rebuild_handler(handler, lambda behavior: self._bounded(details.method, behavior))

    def _acquire(self, method: str) -> bool:
        with self._lock:
            if self._open[method] >= self._limit:
                return False
            self._open[method] += 1
            return True

    def _release(self, method: str) -> None:
        with self._lock:
            self._open[method] -= 1

    def _bounded(self, method: str, behavior: Callable) -> Callable:
        # a non-blocking behaviour (health Watch) takes a send_response_callback too
        def call(request: object, context: grpc.ServicerContext, *callback: Callable) -> object:
            if not self._acquire(method):
                error = ResourceExhaustedError(
                    f"{method}: {self._limit} calls of this method are in flight, this "
                    "server's limit for calls without a token; retry later"
                )
                context.abort(status_of(error), str(error))
            if not context.add_callback(lambda: self._release(method)):
                self._release(method)  # the call has already terminated
            return behavior(request, context, *callback)

        return call


def _denial(method: str) -> Callable[..., object]:
    # a non-blocking behaviour would get a send_response_callback too: ignored
    def deny(request: object, context: grpc.ServicerContext, *_callback: Callable) -> object:
        logger.warning(
            "rejected %s from %s: missing or invalid bearer token", method, context.peer()
        )
        error = AuthenticationError(
            "missing or invalid bearer token: send metadata 'authorization: Bearer <token>' "
            "with a token from the server's --token-file"
        )
        context.abort(status_of(error), str(error))

    return deny
