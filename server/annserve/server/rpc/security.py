"""Transport security (TLS, mutual TLS) and bearer-token authentication of the server."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from annserve.errors import AuthenticationError
from annserve.server.rpc.handlers import rebuild_handler
from annserve.server.rpc.service import status_of

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

logger = logging.getLogger(__name__)

#: Methods any caller may use without a token: liveness probes carry no secrets.
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)


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


def _denial(method: str) -> Callable[[object, grpc.ServicerContext], object]:
    def deny(request: object, context: grpc.ServicerContext) -> object:
        logger.warning(
            "rejected %s from %s: missing or invalid bearer token", method, context.peer()
        )
        error = AuthenticationError(
            "missing or invalid bearer token: send metadata 'authorization: Bearer <token>' "
            "with a token from the server's --token-file"
        )
        context.abort(status_of(error), str(error))

    return deny
