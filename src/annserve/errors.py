"""One error hierarchy for server and client, and its one table of status codes.

Each class also inherits the builtin it refines, so callers may catch either. Each
class names, once, the gRPC status the server sends for it (``grpc_status``; the
client maps that status, and any in ``also_from``, back to the class) and the
``annserve`` commands' exit code where it has one (``exit_code``). The server's map
(:func:`annserve.server.rpc.service.status_of`) and the client's
(:func:`annserve.client._rpc.translate`) are both derived from :func:`error_for_status`
and the class attributes. Status codes are named by string so this module imports
no grpc.

=============================  ===============================================  =========
class                          gRPC status (also mapped back from)              exit code
=============================  ===============================================  =========
``InvalidRequestError``        ``INVALID_ARGUMENT``                             2
``StoreNotFoundError``         ``NOT_FOUND``                                    3
``OutOfRangeError``            ``OUT_OF_RANGE``                                 2
``StoreFormatError``           ``FAILED_PRECONDITION``                          3
``DataLossError``              ``DATA_LOSS``                                    3
``ResourceExhaustedError``     ``RESOURCE_EXHAUSTED``
``AuthenticationError``        ``UNAUTHENTICATED`` (``PERMISSION_DENIED``)
``ServerUnavailableError``     ``UNAVAILABLE`` (``DEADLINE_EXCEEDED``)
``StreamStalledError``         ``DEADLINE_EXCEEDED``
``FrameDecodeError``           none: raised by the client only
any other ``AnnServeError``    ``INTERNAL``                                     1
=============================  ===============================================  =========
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from collections.abc import Iterable

#: The names of ``grpc.StatusCode`` but ``OK``, from the gRPC status code specification.
STATUS_NAMES = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
#: Characters of a client-sent value that a message (or log line) quotes at most.
QUOTE_CHARS = 100
#: Items of a list that a message names at most.
LIST_ITEMS = 10

#: Error class by status name: filled as each class is defined (``__init_subclass__``).
_BY_STATUS: dict[str, type[AnnServeError]] = {}


class AnnServeError(Exception):
    """Base class of every error annserve raises on purpose.

    Attributes
    ----------
    grpc_status
        Name of the ``grpc.StatusCode`` the server ends a call with for this error;
        None for errors that never cross the wire.
    also_from
        Further status names the client maps to this class.
    exit_code
        Exit code of the ``annserve`` commands when this error stops them.
    """

    grpc_status: ClassVar[str | None] = "INTERNAL"
    also_from: ClassVar[tuple[str, ...]] = ()
    exit_code: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Check the class's status names and exit code; enter its statuses in the table.

        Raises
        ------
        TypeError
            If ``grpc_status`` or ``also_from`` names no non-OK gRPC status, or
            ``exit_code`` is not an integer from 1 to 125.
        """
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("grpc_status")
        statuses = (*((own,) if own is not None else ()), *cls.__dict__.get("also_from", ()))
        unknown = [s for s in statuses if s not in STATUS_NAMES]
        if unknown:
            msg = f"{cls.__name__}: unknown gRPC status {unknown}; allowed {sorted(STATUS_NAMES)}"
            raise TypeError(msg)
        code = cls.exit_code
        if not isinstance(code, int) or isinstance(code, bool) or not 1 <= code <= 125:
            msg = f"{cls.__name__}: exit_code must be an integer from 1 to 125, got {code!r}"
            raise TypeError(msg)
        for status in statuses:
            _BY_STATUS.setdefault(status, cls)  # the first class claiming a status keeps it


class InvalidRequestError(AnnServeError, ValueError):
    """A request field has a value the server cannot serve (``INVALID_ARGUMENT``)."""

    grpc_status = "INVALID_ARGUMENT"
    exit_code = 2


class OutOfRangeError(InvalidRequestError):
    """A position is past the end of what it counts, e.g. ``start_batch`` (``OUT_OF_RANGE``)."""

    grpc_status = "OUT_OF_RANGE"


class StoreNotFoundError(AnnServeError, FileNotFoundError):
    """A store path does not exist, or a request names an unknown store (``NOT_FOUND``)."""

    grpc_status = "NOT_FOUND"
    exit_code = 3


class StoreFormatError(AnnServeError, ValueError):
    """A store exists but is not a readable AnnData store of a supported layout."""

    grpc_status = "FAILED_PRECONDITION"
    exit_code = 3


class DataLossError(StoreFormatError):
    """Stored data that should be there is missing or corrupt (``DATA_LOSS``).

    A CSR ``data``/``indices`` chunk that ``indptr`` says was written but is absent, a
    truncated shard, a compressed chunk that does not decode: the message names the
    store, the array and the chunk. Never served as zeros or as other rows.
    """

    grpc_status = "DATA_LOSS"


class FrameDecodeError(AnnServeError, ValueError):
    """A received frame is malformed or truncated; its data must not be used."""

    grpc_status = None


class ServerUnavailableError(AnnServeError, ConnectionError):
    """The server at the given address cannot be reached (``UNAVAILABLE``)."""

    grpc_status = "UNAVAILABLE"
    also_from = ("DEADLINE_EXCEEDED",)


class StreamStalledError(ServerUnavailableError):
    """The client took no frame (or freed no shared-memory slot) within the stall timeout."""

    grpc_status = "DEADLINE_EXCEEDED"


class ResourceExhaustedError(AnnServeError, RuntimeError):
    """A request exceeds a server limit, named in the message (``RESOURCE_EXHAUSTED``)."""

    grpc_status = "RESOURCE_EXHAUSTED"


class AuthenticationError(AnnServeError, PermissionError):
    """A call carried no valid credentials (``UNAUTHENTICATED``)."""

    grpc_status = "UNAUTHENTICATED"
    also_from = ("PERMISSION_DENIED",)


def error_for_status(status: str) -> type[AnnServeError]:
    """Return the error class a call that ended with ``status`` (a status name) raises.

    :class:`AnnServeError` itself for statuses no subclass claims (e.g. ``INTERNAL``).
    """
    return _BY_STATUS.get(status, AnnServeError)


def quoted(value: object) -> str:
    """Return ``repr(value)`` cut to :data:`QUOTE_CHARS` characters, for messages and logs.

    A client may send a name megabytes long; echoing it whole would bloat the log and
    push the status message over gRPC's metadata limit, so the client would see that
    instead of the error.
    """
    text = repr(value)
    if len(text) <= QUOTE_CHARS:
        return text
    return f"{text[:QUOTE_CHARS]}... ({len(text):,} characters)"


def listed(values: Iterable[object]) -> str:
    """Return the first :data:`LIST_ITEMS` values, each :func:`quoted`, and how many there are."""
    items = list(values)
    shown = ", ".join(quoted(v) for v in items[:LIST_ITEMS])
    more = f", ... ({len(items):,} in all)" if len(items) > LIST_ITEMS else ""
    return f"[{shown}{more}]"
