"""Run a generator ahead of its consumer in a background thread, with a bounded queue."""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

T = TypeVar("T")

_POLL_S = 0.1  # seconds between checks of the stop flag while blocked
_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``produce()`` in a daemon thread, at most ``maxsize`` items ahead.

    The producer stops within about 0.1 s of :meth:`close` (or of the consumer
    abandoning the iteration), and its exception, if any, is re-raised in the
    consumer.

    Parameters
    ----------
    produce
        Returns the iterator to run in the background.
    maxsize
        Items that may wait in the queue (> 0).
    name
        Thread name, for logs and debuggers.
    """

    def __init__(self, produce: Callable[[], Iterator[T]], maxsize: int, name: str) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator[T]]) -> None:
        try:
            for item in produce():
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._error = e
        self._put(_DONE)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            return True
        return False

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                if item is _DONE:
                    if self._error is not None:
                        raise self._error
                    return
                yield item  # type: ignore[misc]
        finally:
            self.close()

    @property
    def pending(self) -> int:
        """Items produced and waiting for the consumer (approximate)."""
        return self._queue.qsize()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the producer and wait up to ``timeout`` seconds for its thread to end."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
