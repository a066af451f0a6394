"""The ``grpc.health.v1.Health`` servicer, safe against Watch streams that come and go.

grpc runs an RPC's termination callbacks on the server's single completion-queue
thread, the one that also completes every send. grpc_health's ``Watch`` registers a
callback that takes the servicer's lock when the stream closes, while ``Watch`` itself
(and ``set``) hold that lock during a send and wait for the send to complete. So one
Watch closing while another opens stops the whole server: the completion-queue thread
waits for the lock, and the lock's holder waits for that thread (seen with py-spy: a
daemon that answered no call, not even health ``Check``, and could not stop; eight
threads opening and closing Watch streams wedged it within 5 s). Here those close
callbacks run on a thread of their own instead.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

from grpc_health.v1 import health

if TYPE_CHECKING:
    from collections.abc import Callable

    import grpc


class _CallbacksElsewhere:
    """A ``grpc.ServicerContext`` whose ``add_callback`` callbacks run on ``executor``."""

    def __init__(self, context: grpc.ServicerContext, executor: ThreadPoolExecutor) -> None:
        self._context, self._executor = context, executor

    def add_callback(self, callback: Callable[[], None]) -> bool:
        def elsewhere() -> None:
            self._executor.submit(callback)

        return self._context.add_callback(elsewhere)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class HealthServicer(health.HealthServicer):
    """grpc_health's servicer; a Watch stream's close is handled off grpc's polling thread.

    Same statuses, methods and graceful shutdown as ``grpc_health.v1.health.HealthServicer``.
    """

    def __init__(self) -> None:
        super().__init__()
        # one thread: closes only remove a watcher and end its stream, in order
        self._closes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="annserve-health")

    def Watch(  # noqa: N802  (the gRPC method's name)
        self,
        request: Any,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[Any], None] | None = None,
    ) -> Any:
        """Stream the service's status as grpc_health does (non-blocking)."""
        # duck-typed: every other attribute is the real context's
        proxy = cast("grpc.ServicerContext", _CallbacksElsewhere(context, self._closes))
        return super().Watch(request, proxy, send_response_callback)

    def close(self) -> None:
        """Let the close callbacks' thread end; call once the server has stopped."""
        self._closes.shutdown(wait=False)
