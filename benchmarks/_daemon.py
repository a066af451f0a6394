"""The ``annserve`` daemon and its trainer processes, shared by the benchmark scripts.

Standard library at import time (annserve's client is imported by the trainer-side
functions only when called), so every benchmark environment can import it.

- :class:`Daemon`: ``annserve --store ... --port 0`` as a subprocess, its addresses
  read off its log, its CPU, memory and metrics;
- :func:`add_loader_args`, :func:`client_parser`, :func:`loader_flags`: the loader
  options every script and its trainers share;
- :func:`interleaved`: rounds of every configuration, the order rotated;
- :func:`run_synced`: trainers that start their measured stretch together;
  :func:`remote_loader`, :func:`torch_batches`, :func:`synced_stream`: their side.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from _measure import cpu_seconds, proc_status_mb, process_cpu_seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping

_LISTEN_TCP = re.compile(r"listening on [\d.]+:(\d+)")
_LISTEN_UNIX = re.compile(r"listening on unix:(\S+)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")
K = TypeVar("K", bound="Hashable")


def passive_env() -> dict[str, str]:
    """``os.environ`` with ``OMP_WAIT_POLICY=PASSIVE`` unless set.

    torch's OpenMP threads then sleep between batches instead of spinning (spinning
    takes a core from whatever loads the data: a daemon, zarrs' threads).
    """
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return out


class Daemon:
    """``annserve --store STORE --host 127.0.0.1 --port 0 [FLAGS]`` as a subprocess.

    Parameters
    ----------
    store
        Store to serve.
    flags
        Further command-line flags, e.g. ``["--workers", "2"]``.
    unix
        Also listen on this unix socket (shared memory offered there); None for TCP only.
    metrics
        Also serve Prometheus metrics on a free port (``--metrics-port 0``).
    env
        Environment of the daemon, default ``os.environ``; ``ANNSERVE_*`` variables are
        dropped (flags only).
    timeout
        Seconds to wait for it to log its addresses.

    Attributes
    ----------
    addresses
        ``{"tcp": "127.0.0.1:PORT"}``, plus ``"shm": "unix:PATH"`` with ``unix``.
    metrics_url
        ``http://.../metrics`` with ``metrics``, else empty.

    Raises
    ------
    RuntimeError
        If the daemon exits or does not log its addresses within ``timeout``.
    """

    def __init__(
        self,
        store: Path,
        flags: list[str] | None = None,
        unix: Path | None = None,
        metrics: bool = False,
        env: Mapping[str, str] | None = None,
        timeout: float = 180.0,
    ) -> None:
        flags = list(flags or [])
        flags += ["--unix", str(unix)] if unix is not None else []
        flags += ["--metrics-port", "0"] if metrics else []
        env = {k: v for k, v in (env or os.environ).items() if not k.startswith("ANNSERVE_")}
        cmd = [sys.executable, "-m", "annserve.server.rpc.cli", "--store", str(store)]
        cmd += ["--host", "127.0.0.1", "--port", "0", *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.log: collections.deque[str] = collections.deque(maxlen=50)
        self.addresses: dict[str, str] = {}
        self.metrics_url = ""
        self._want = {"tcp"} | ({"shm"} if unix is not None else set())
        self._want |= {"metrics"} if metrics else set()
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout) or "tcp" not in self.addresses:
            self.stop()
            tail = "".join(list(self.log)[-5:]).strip()
            msg = f"annserve {' '.join(flags)} on {store} did not start: {tail or 'no output'}"
            raise RuntimeError(msg)

    @property
    def address(self) -> str:
        """The unix address when the daemon has one, else the TCP one."""
        return self.addresses.get("shm") or self.addresses["tcp"]

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := _METRICS.search(line):
                self.metrics_url = m.group(1)
            elif (m := _LISTEN_TCP.search(line)) and "tcp" not in self.addresses:
                self.addresses["tcp"] = f"127.0.0.1:{m.group(1)}"
            elif m := _LISTEN_UNIX.search(line):
                self.addresses["shm"] = f"unix:{m.group(1)}"
            got = set(self.addresses) | ({"metrics"} if self.metrics_url else set())
            if self._want <= got:
                self._ready.set()
        self._ready.set()  # exited: wake the waiter

    def cpu_seconds(self, tree: bool = False) -> float:
        """CPU the daemon has used so far, user + system, all threads, seconds.

        With ``tree``, that of every process of the daemon (``--workers``' supervisor,
        workers, multiprocessing's resource tracker); exited ones are not counted.
        """
        total = 0.0
        for pid in process_tree(self.proc.pid) if tree else [self.proc.pid]:
            try:
                total += process_cpu_seconds(pid)
            except FileNotFoundError:
                if not tree:
                    raise
        return total

    def memory_mb(self, field_name: str) -> float:
        """``VmHWM`` (peak) or ``VmRSS`` (now) of the daemon, MiB (NaN when absent)."""
        try:
            return proc_status_mb(field_name, self.proc.pid)
        except KeyError:
            return float("nan")

    def metrics(self) -> str:
        """The daemon's Prometheus metrics text (empty without ``metrics``)."""
        import urllib.request  # here: trainers import this module and measure their RSS

        if not self.metrics_url:
            return ""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:  # noqa: S310
            return response.read().decode()

    def stop(self) -> None:
        """SIGTERM the daemon and wait for it (SIGKILL after 30 s)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def run_json(
    cmd: list[str], env: Mapping[str, str] | None = None, timeout: float = 600.0
) -> dict[str, Any]:
    """Run a worker and parse the JSON on the last line of its stdout.

    Parameters
    ----------
    cmd
        Command line.
    env
        Its environment, default :func:`passive_env`.
    timeout
        Seconds it may take.

    Raises
    ------
    RuntimeError
        If it fails, times out, or prints no JSON; the message ends with its stderr tail.
    """
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=dict(env) if env is not None else passive_env(),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        msg = f"timed out after {timeout:g} s"
        raise RuntimeError(msg) from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = out.stderr.strip().splitlines()[-1:] or ["no output"]
        msg = f"exit {out.returncode}: {tail[0]}"
        raise RuntimeError(msg)
    return json.loads(lines[-1])


def add_loader_args(p: argparse.ArgumentParser, helps: bool = False) -> None:
    """Add ``--batch-size``, ``--chunk-size``, ``--preload-nchunks`` (4096, 32, 256)."""
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch" if helps else None)
    p.add_argument(
        "--chunk-size", type=int, default=32, help="contiguous rows per chunk" if helps else None
    )
    p.add_argument(
        "--preload-nchunks",
        type=int,
        default=256,
        help="chunks per preload buffer" if helps else None,
    )


def client_parser(prog: str, max_cells: int | None) -> argparse.ArgumentParser:
    """Return a trainer's parser: ``--address``, ``--seed``, the loader's, ``--max-cells``."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--address", required=True)
    p.add_argument("--seed", type=int, default=0)
    add_loader_args(p)
    p.add_argument("--max-cells", type=int, default=max_cells)
    return p


def add_round_args(p: argparse.ArgumentParser, max_cells: int) -> None:
    """Add the loader's options, ``--max-cells`` (per trainer per round) and ``--timeout``."""
    add_loader_args(p)
    p.add_argument(
        "--max-cells",
        type=int,
        default=max_cells,
        help="cells per trainer per round, epochs one after another (default %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per round")


def interleaved(
    configs: list[K],
    reps: int,
    run: Callable[[K], dict[str, float]],
    say: Callable[[K, dict[str, float]], str],
) -> dict[K, list[dict[str, float]]]:
    """Run every configuration once per repetition, the order rotated each repetition.

    Parameters
    ----------
    configs
        The configurations, in their first repetition's order.
    reps
        Repetitions.
    run
        Runs one round of a configuration; returns its figures.
    say
        Describes a round's result; printed to stderr after ``rep N``.

    Returns
    -------
    Each configuration's figures, one dict per repetition.
    """
    rounds: dict[K, list[dict[str, float]]] = {k: [] for k in configs}
    for rep in range(reps):
        shift = rep % len(configs)
        for k in configs[shift:] + configs[:shift]:
            rounds[k].append(run(k))
            print(f"  rep {rep} {say(k, rounds[k][-1])}", file=sys.stderr, flush=True)
    return rounds


def loader_flags(args: argparse.Namespace) -> list[str]:
    """The options of :func:`add_loader_args` as a command line."""
    return [
        *("--batch-size", str(args.batch_size)),
        *("--chunk-size", str(args.chunk_size)),
        *("--preload-nchunks", str(args.preload_nchunks)),
    ]


def run_synced(
    cmds: list[list[str]], timeout: float, probe: Callable[[], dict[str, float]]
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run trainers (:func:`synced_stream`) that start their measured stretch together.

    Each trainer takes a batch and says ``ready``; then ``probe`` is read, every
    trainer is released (a line on its stdin), all are waited for and ``probe`` is read
    again.

    Parameters
    ----------
    cmds
        One command line per trainer.
    timeout
        Seconds a trainer may take, for each of the two waits.
    probe
        Counters to difference over the stretch (e.g. the daemon's CPU seconds).

    Returns
    -------
    Each trainer's JSON result, and each counter's change (a counter absent before
    counts from 0).

    Raises
    ------
    RuntimeError
        If a trainer fails; the message ends with its stderr tail.
    """
    env = passive_env()
    procs = [
        subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for cmd in cmds
    ]
    for p in procs:  # each has its first batch
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            msg = f"trainer failed: {p.communicate(timeout=timeout)[1].strip()[-500:]}"
            raise RuntimeError(msg)
    before = probe()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [_result(p, timeout) for p in procs]
    return results, {k: v - before.get(k, 0.0) for k, v in probe().items()}


def _result(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        msg = f"trainer failed: {err.strip().splitlines()[-3:]}"
        raise RuntimeError(msg)
    return json.loads(out.strip().splitlines()[-1])


def remote_loader(args: argparse.Namespace, seed: int) -> Any:
    """``RemoteLoader`` on ``args.address`` with the loader's options; shuffled, torch CSR out."""
    from annserve.client import Output, RemoteLoader

    return RemoteLoader(
        args.address,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        shuffle=True,
        seed=seed,
        output=Output(to_torch=True),
    )


def torch_batches(args: argparse.Namespace) -> Iterator[tuple[int, float]]:
    """Yield ``(rows, sum of X's values)`` per batch of epoch after epoch (RemoteLoader).

    ``args`` holds :func:`client_parser`'s options; shuffled, X as torch sparse CSR.
    """
    loader = remote_loader(args, args.seed)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from batch_sums(loader)


def batch_sums(batches: Iterable[dict[str, Any]]) -> Iterator[tuple[int, float]]:
    """Yield ``(rows, sum of X's values)`` per batch, X a torch sparse CSR tensor.

    The sum touches every value, as a model's first layer would; the sums add up to a
    checksum that must agree between loaders of the same data.
    """
    for batch in batches:
        x = batch["X"]
        yield x.shape[0], float(x.values().sum())


def synced_stream(batches: Iterator[tuple[int, float]], max_cells: int) -> int:
    """A trainer's side of :func:`start_trainers`: print one JSON line; return 0.

    Takes a batch, says ``ready``, waits for a line on stdin, then consumes
    ``(rows, checksum part)`` pairs up to ``max_cells`` rows. The JSON holds
    ``cells``, ``start`` and ``end`` (epoch seconds), ``cpu_s`` and ``checksum``.
    """
    next(batches)  # connected, the daemon's first preload buffer read
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()
    t0, cpu0 = time.time(), cpu_seconds()
    cells, checksum = 0, 0.0
    for rows, total in batches:
        checksum += total
        cells += rows
        if cells >= max_cells:
            break
    result = {
        "cells": cells,
        "start": t0,
        "end": time.time(),
        "cpu_s": cpu_seconds() - cpu0,
        "checksum": checksum,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
