"""One error hierarchy for server and client.

Each class also inherits the builtin it refines, so callers may catch either.
The server maps these classes to gRPC status codes in one place
(:data:`annserve.server.rpc.service.STATUS_OF`); the client maps status codes back.
"""

from __future__ import annotations


class AnnServeError(Exception):
    """Base class of every error annserve raises on purpose."""


class InvalidRequestError(AnnServeError, ValueError):
    """A request field has a value the server cannot serve (``INVALID_ARGUMENT``)."""


class StoreNotFoundError(AnnServeError, FileNotFoundError):
    """A store path does not exist, or a request names an unknown store (``NOT_FOUND``)."""


class StoreFormatError(AnnServeError, ValueError):
    """A store exists but is not a readable AnnData store of a supported layout."""


class FrameDecodeError(AnnServeError, ValueError):
    """A received frame is malformed or truncated; its data must not be used."""


class ServerUnavailableError(AnnServeError, ConnectionError):
    """The server at the given address cannot be reached (``UNAVAILABLE``)."""


class ResourceExhaustedError(AnnServeError, RuntimeError):
    """A request exceeds a server limit, named in the message (``RESOURCE_EXHAUSTED``)."""


class AuthenticationError(AnnServeError, PermissionError):
    """A call carried no valid credentials (``UNAUTHENTICATED``)."""
