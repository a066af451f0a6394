"""``annserve --workers N``: N worker processes serving one TCP port, and their supervisor.

One Python process reads, gathers and encodes with about one core's worth of CPU
whatever its threads (the GIL is held for much of the per-frame work), so the daemon
can run several: the supervisor (the process ``annserve`` started) checks that the
port is free, resolves ``--port 0`` once and holds the port with a bound, non-listening
``SO_REUSEPORT`` socket, then starts N workers with ``multiprocessing``'s ``spawn``
(gRPC does not survive ``fork``). Each worker opens the stores and runs the whole gRPC
server (:func:`annserve.server.rpc.cli.serve`) on that port with ``SO_REUSEPORT``: the
kernel spreads incoming connections over the workers (by a hash of the connection's
addresses; all calls of one connection go to one worker, and one client process shares
one connection among its channels to the same address).

What stays daemon-wide:

* ``--max-streams`` counts the streams of all workers (a shared array of each worker's
  open streams, :class:`SharedStreamSlots`); a dead worker's slots are freed.
* ``/metrics`` is served once, by the supervisor, from prometheus_client's multiprocess
  files in a private temporary directory it creates and removes.
* SIGTERM/SIGINT on the supervisor is passed on to every worker, which drains as a
  single daemon does (health ``NOT_SERVING``, ``--grace``); the supervisor exits 0 once
  all have stopped, 1 if one had to be killed ``KILL_SLACK_S`` s after its grace.
* A worker that dies after it was ready is logged and restarted (at most one start per
  :data:`RESTART_BACKOFF_S` s for each worker); one that exits before it was ready (a
  store it cannot open, an address it cannot bind) stops the daemon with its exit code.
* Workers die with the supervisor: ``PR_SET_PDEATHSIG`` (Linux) sends them SIGTERM
  when it goes away, even by SIGKILL, and they drain within ``--grace`` + 1 s; elsewhere a
  thread watching the supervisor does the same. The metrics directory of a supervisor
  killed by SIGKILL stays behind (prefix ``annserve-metrics-``, a few KB).

A unix socket (``--unix``) cannot be shared with ``SO_REUSEPORT`` (a second bind of the
path fails, or replaces the first listener's file): worker 0 alone listens on it, so
same-host trainers on the unix socket are served by one process; TCP clients use all.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import multiprocess

from annserve import libc
from annserve.server.rpc.metrics import Metrics, multiprocess_registry, serve_registry

if TYPE_CHECKING:
    import argparse
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.sharedctypes import SynchronizedArray

    from annserve.server.plan.limits import Limits
    from annserve.server.rpc.app import AnnServer

logger = logging.getLogger("annserve")

#: Environment variable prometheus_client reads at import for its multiprocess files.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Fewest seconds between two starts of one worker (a crash loop restarts no faster).
RESTART_BACKOFF_S = 1.0
#: Seconds a stopping worker gets beyond ``--grace`` + 1 s before it is killed.
KILL_SLACK_S = 5.0
#: Seconds a worker gets to open its stores and bind (stores on a slow disk).
START_TIMEOUT_S = 600.0
#: Seconds between two refreshes of a worker's ``annserve_frames_queued``.
GAUGE_REFRESH_S = 1.0
#: Seconds between two looks of the supervisor at its workers (and at signals).
POLL_S = 0.2
#: Exit code of a daemon that had to kill a worker at shutdown.
EXIT_WORKER_KILLED = 1
EXIT_BIND = 4
_PR_SET_PDEATHSIG = 1


def worker_count(requested: int) -> int:
    """Return the workers to start for ``--workers requested``: 0 is one per usable CPU."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class SharedStreamSlots:
    """``--max-streams`` counted over all workers: each worker's open streams, shared.

    Parameters
    ----------
    counts
        One count per worker, in shared memory, with its lock
        (``multiprocessing.Array("i", n)``).
    index
        The worker this process is; None in the supervisor (which only frees slots).
    """

    def __init__(self, counts: SynchronizedArray[int], index: int | None = None) -> None:
        self._counts = counts
        self._index = index

    def acquire(self, limit: int) -> int:
        """Take a slot when fewer than ``limit`` are taken; return how many were taken before."""
        assert self._index is not None
        with self._counts.get_lock():
            taken = sum(self._counts[:])
            if taken < limit:
                self._counts[self._index] += 1
            return taken

    def release(self) -> None:
        """Give back a slot this worker took."""
        assert self._index is not None
        with self._counts.get_lock():
            self._counts[self._index] -= 1

    def reset(self, index: int) -> None:
        """Free every slot of worker ``index`` (it died)."""
        with self._counts.get_lock():
            self._counts[index] = 0


class Worker:
    """What :func:`annserve.server.rpc.cli.serve` needs to run as one worker.

    Attributes
    ----------
    index
        0 to N - 1.
    port
        The TCP port all workers bind.
    slots
        The daemon-wide ``--max-streams`` count.
    """

    def __init__(
        self,
        index: int,
        port: int,
        slots: SharedStreamSlots,
        ready: multiprocessing.connection.Connection,
    ) -> None:
        self.index, self.port, self.slots = index, port, slots
        self._ready = ready

    def metrics(self) -> Metrics:
        """Return this worker's metrics (counted into the multiprocess files)."""
        return Metrics(per_process=True)

    def serving(self, server: AnnServer, stop: threading.Event) -> None:
        """Tell the supervisor this worker serves; keep its queued-frames gauge current.

        In multiprocess mode a gauge's value is what was last set in the file, so the
        gauge computed on demand in a single process is refreshed every
        :data:`GAUGE_REFRESH_S` s until ``stop`` is set.
        """

        def refresh() -> None:
            while not stop.wait(GAUGE_REFRESH_S):
                server.metrics.frames_queued.set(server.service.frames_queued())

        threading.Thread(target=refresh, name="annserve-gauges", daemon=True).start()
        self._ready.send(os.getpid())
        self._ready.close()


def _die_with_parent(parent: int) -> None:
    """Get SIGTERM when the supervisor ``parent`` is gone, however it ended."""
    prctl = libc.function("prctl")
    if prctl is not None:  # else the watch below alone
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)
    sentinel = multiprocessing.parent_process()
    if sentinel is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([sentinel.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="annserve-parent-watch", daemon=True).start()


def _worker_main(
    index: int,
    args: argparse.Namespace,
    limits: Limits,
    port: int,
    counts: SynchronizedArray[int],
    ready: multiprocessing.connection.Connection,
    parent: int,
) -> None:
    """Run one worker: the daemon of ``args`` on ``port``; exit with its exit code."""
    _die_with_parent(parent)
    from annserve.server.rpc.cli import serve  # cli imports this module
    from annserve.server.rpc.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    if args.log_format == "text":  # which worker logged a line (stream ids are per worker)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s")
            )
    sys.exit(serve(args, limits, Worker(index, port, SharedStreamSlots(counts, index), ready)))


def reserve_port(host: str, port: int) -> socket.socket:
    """Check that ``host:port`` is free and hold it for the workers; return the socket.

    The socket binds without ``SO_REUSEPORT`` (so a port any process holds, another
    annserve's workers too, fails here) and then allows it, so that the workers' gRPC
    servers bind the same port; it never listens, so connections go to the workers
    only. ``port`` 0 picks a free port (``getsockname()``).

    Raises
    ------
    OSError
        If the address does not resolve or is in use.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    held = socket.socket(family, kind, proto)
    try:
        held.bind(address)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        held.close()
        raise
    return held


class _Handle:
    """The supervisor's view of one worker process."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: SpawnProcess | None = None
        self.conn: multiprocessing.connection.Connection | None = None  # until ready
        self.started = -RESTART_BACKOFF_S
        self.ready = False


class Supervisor:
    """Start, watch, restart and stop the workers of one daemon.

    Parameters
    ----------
    args, limits
        The parsed command line; ``args.workers`` workers (0: one per CPU).
    port
        The resolved TCP port.
    metrics_dir
        The workers' ``PROMETHEUS_MULTIPROC_DIR``.
    """

    def __init__(
        self, args: argparse.Namespace, limits: Limits, port: int, metrics_dir: str
    ) -> None:
        self.args, self.limits, self.port, self.metrics_dir = args, limits, port, metrics_dir
        self._ctx: SpawnContext = multiprocessing.get_context("spawn")
        self.workers = [_Handle(i) for i in range(worker_count(args.workers))]
        self._counts = self._ctx.Array("i", len(self.workers))
        self._slots = SharedStreamSlots(self._counts)
        self.stop = threading.Event()

    def _start(self, handle: _Handle) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_worker_main,
            args=(handle.index, self.args, self.limits, self.port, self._counts, send, os.getpid()),
            name=f"annserve-worker-{handle.index}",
        )
        process.start()
        send.close()
        handle.process, handle.conn, handle.ready = process, receive, False
        handle.started = time.monotonic()

    def _ended(self, handle: _Handle) -> None:
        """Account for a worker that exited: free its slots, drop its live gauges."""
        assert handle.process is not None
        handle.process.join()
        multiprocess.mark_process_dead(handle.process.pid, self.metrics_dir)
        self._slots.reset(handle.index)
        if handle.conn is not None:
            handle.conn.close()
            handle.conn = None

    def _events(self) -> tuple[list[_Handle], list[_Handle]]:
        """Wait up to :data:`POLL_S` s; return the workers now ready, those that exited."""
        waits: dict[object, tuple[str, _Handle]] = {}
        for h in self.workers:
            if h.process is None:
                continue
            waits[h.process.sentinel] = ("exit", h)
            if h.conn is not None:
                waits[h.conn] = ("ready", h)
        got = multiprocessing.connection.wait(list(waits), POLL_S)  # type: ignore[arg-type]
        ready, exited = [], []
        for key in got:
            what, h = waits[key]
            if what == "exit":
                exited.append(h)
            elif h.conn is not None:
                try:
                    h.conn.recv()
                except EOFError:  # it exited before it was ready
                    continue
                h.conn.close()
                h.conn, h.ready = None, True
                ready.append(h)
        return ready, exited

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the daemon's exit code."""
        for h in self.workers:
            self._start(h)
        serving = False
        deadline = time.monotonic() + START_TIMEOUT_S
        code = 0
        while not self.stop.is_set():
            ready, exited = self._events()
            for h in ready:
                assert h.process is not None
                logger.info("worker %d (pid %d) serving", h.index, h.process.pid)
            if not serving and all(h.ready for h in self.workers):
                serving = True
                from annserve.server.rpc.cli import log_listening

                log_listening(self.args, self.port)
                if self.args.unix:
                    logger.info("unix:%s is served by worker 0 only", self.args.unix)
            for h in exited:
                assert h.process is not None
                was_ready = h.ready
                self._ended(h)  # joins it: its exit code is known
                status = h.process.exitcode
                if not was_ready:
                    logger.error(
                        "worker %d (pid %d) exited with code %s before it was serving; stopping",
                        h.index,
                        h.process.pid,
                        status,
                    )
                    code = status if status and status > 0 else 1
                    self.stop.set()
                elif self.stop.is_set():  # a signal to the process group reached it too
                    logger.info("worker %d (pid %d) exited (%s)", h.index, h.process.pid, status)
                else:
                    logger.error(
                        "worker %d (pid %d) died (exit code %s); restarting it",
                        h.index,
                        h.process.pid,
                        status,
                    )
                    h.process = None
            now = time.monotonic()
            for h in self.workers:
                restart = h.process is None and now - h.started >= RESTART_BACKOFF_S
                if restart and not self.stop.is_set():
                    self._start(h)
            if not serving and now > deadline:
                logger.error("workers not serving after %.0f s; stopping", START_TIMEOUT_S)
                code = 1
                self.stop.set()
        return self._shutdown(code)

    def _shutdown(self, code: int) -> int:
        """SIGTERM every worker, wait for them to drain; kill those that do not in time."""
        running = [h for h in self.workers if h.process is not None and h.process.is_alive()]
        logger.info(
            "stopping %d worker(s): each drains within %.1f s", len(running), self.args.grace
        )
        for h in running:
            assert h.process is not None
            h.process.terminate()  # SIGTERM
        deadline = time.monotonic() + self.args.grace + 1 + KILL_SLACK_S
        for h in self.workers:
            if h.process is None:
                continue
            h.process.join(max(0.0, deadline - time.monotonic()))
            if h.process.is_alive():
                logger.error("worker %d (pid %d) did not stop; killing it", h.index, h.process.pid)
                h.process.kill()
                code = code or EXIT_WORKER_KILLED
            self._ended(h)
        return code


def supervise(args: argparse.Namespace, limits: Limits) -> int:
    """Run ``args.workers`` worker processes on one port until SIGTERM/SIGINT; return the exit code.

    The supervisor serves ``/metrics`` (``--metrics-port``) for all of them and logs
    ``listening on HOST:PORT`` once every worker serves.
    """
    try:
        held = reserve_port(args.host, args.port)
    except OSError as e:
        print(f"annserve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return EXIT_BIND
    metrics_dir = tempfile.mkdtemp(prefix="annserve-metrics-")
    previous = os.environ.get(MULTIPROC_DIR_ENV)
    # read by prometheus_client when a worker imports it: spawned workers inherit it
    os.environ[MULTIPROC_DIR_ENV] = metrics_dir
    endpoint = None
    try:
        supervisor = Supervisor(args, limits, held.getsockname()[1], metrics_dir)
        if args.metrics_port is not None:
            metrics_host = args.metrics_host or args.host
            try:
                endpoint = serve_registry(
                    multiprocess_registry(metrics_dir), metrics_host, args.metrics_port
                )
            except OSError as e:
                print(
                    f"annserve: cannot bind metrics on {metrics_host}:{args.metrics_port}: {e}",
                    file=sys.stderr,
                )
                return EXIT_BIND
            logger.info("metrics on http://%s:%d/metrics", metrics_host, endpoint.port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: supervisor.stop.set())
        logger.info("starting %d workers on port %d", len(supervisor.workers), supervisor.port)
        code = supervisor.run()
        logger.info("stopped (%d workers)", len(supervisor.workers))
        return code
    finally:
        if endpoint is not None:
            endpoint.close()
        held.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
        else:
            os.environ[MULTIPROC_DIR_ENV] = previous
