"""cells/s and CPU per cell of RemoteLoader over bandwidth-limited links (issue 16).

The daemon and its trainers run in a network namespace of their own (``ip netns add
annserve-bench-<pid>``) and talk TCP on that namespace's 127.0.0.1, whose loopback is
shaped with a token bucket (``tc qdisc replace dev lo root tbf ...``) for each
``--rates`` value, plus the namespace's plain loopback as the reference. On each link,
each ``--wire`` configuration (``Connection(encoding=..., compression=...)``) streams
for ``--seconds`` in a fresh trainer process (X as torch sparse CSR, every value
summed as a first layer would). Every (link, wire) configuration runs once per
repetition, the order rotated each repetition; figures are medians over ``--reps``.
Trainer CPU is the trainer process's, daemon CPU the daemon's, both over the measured
stretch; wire bytes per cell are the daemon's ``annserve_sent_bytes_total`` over its
``annserve_cells_total``.

Needs root (``ip netns``, ``tc``): without root, or without ``ip`` or ``tc``, it says so
and exits 0. The namespace and its qdisc are removed on every exit, Ctrl-C included.

    .venv/bin/python benchmarks/bench_links.py --store /tmp/b16/atlas_narrow.zarr
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from _daemon import (
    Daemon,
    add_loader_args,
    batch_sums,
    client_parser,
    interleaved,
    loader_flags,
    run_synced,
    synced_stream,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench_links.md"
DEFAULT_WIRE = "compact:none,compact:lz4,compact:zstd,compact:blosc,native:none,raw:none"
#: The kernel's timer frequency (CONFIG_HZ) on these machines, ticks per second.
HZ = 250
_COUNTER = re.compile(r"^annserve_(sent_bytes|cells)_total\{[^}]*\} (\S+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Link:
    """A rate the namespace's loopback is shaped to.

    Attributes
    ----------
    gbit
        Rate, Gbit/s (10⁹ bits per second); None: the loopback unshaped.
    """

    gbit: float | None

    @property
    def name(self) -> str:
        """``unshaped`` or ``N Gbit/s``."""
        return "unshaped" if self.gbit is None else f"{self.gbit:g} Gbit/s"

    def tbf(self) -> list[str]:
        """The ``tbf`` qdisc's parameters (after ``tc qdisc replace dev lo root``).

        Burst: one timer tick's worth of the rate, rate / HZ bytes (500 kB at 1 Gbit/s,
        5 MB at 10, 12.5 MB at 25). ``tc-tbf(8)``: a bucket smaller than that cannot
        reach the rate (more tokens arrive per tick than it holds); a larger one only
        lets longer bursts through at memory speed. 4 ms at line rate is a quarter of a
        ~2 MB frame at 1 Gbit/s and a few frames at 25 Gbit/s, nothing against rounds of
        seconds, and far above the largest packet (64 KiB GSO on lo), which tbf needs.
        Latency 10 ms: the queue then holds rate x 10 ms + burst (1.75 MB at 1 Gbit/s),
        more than the 1 MiB one TCP socket may have queued below it
        (``tcp_limit_output_bytes``), so the sender is held back, not dropped.
        """
        assert self.gbit is not None
        bits = round(self.gbit * 1e9)
        return ["tbf", "rate", f"{bits}bit", "burst", str(bits // 8 // HZ), "latency", "10ms"]


@dataclass(frozen=True, slots=True)
class Wire:
    """A wire format: ``Connection(encoding=encoding, compression=compression)``."""

    encoding: str
    compression: str | None

    @property
    def name(self) -> str:
        """``encoding/compression``, ``none`` for no compression."""
        return f"{self.encoding}/{self.compression or 'none'}"


def parse_wire(text: str) -> list[Wire]:
    """``compact:none,compact:lz4,...`` as wire formats."""
    wires = []
    for item in text.split(","):
        encoding, _, compression = item.partition(":")
        wires.append(Wire(encoding, None if compression in ("", "none") else compression))
    return wires


def sh(*cmd: str, check: bool = True) -> None:
    """Run a command, its output discarded; raise with its stderr when ``check`` fails."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        msg = f"{' '.join(cmd)}: {done.stderr.strip()}"
        raise RuntimeError(msg)


def set_link(link: Link) -> None:
    """Shape this namespace's loopback to ``link`` (replacing any qdisc), or unshape it."""
    if link.gbit is None:
        sh("tc", "qdisc", "del", "dev", "lo", "root", check=False)  # none there: fine
    else:
        sh("tc", "qdisc", "replace", "dev", "lo", "root", *link.tbf())


def probe_link(link: Link, seconds: float = 1.0) -> float:
    """Shape the loopback to ``link``; return what one plain TCP socket carries, Gbit/s."""
    set_link(link)
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    received = [0]

    def drain() -> None:
        buf = bytearray(4 << 20)
        while n := receiver.recv_into(buf):
            received[0] += n

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    chunk = bytes(4 << 20)
    t0 = time.perf_counter()
    with sender:
        while time.perf_counter() - t0 < seconds:
            sender.sendall(chunk)
    thread.join(30)
    receiver.close()
    return received[0] * 8 / (time.perf_counter() - t0) / 1e9


def daemon_counters(daemon: Daemon) -> dict[str, float]:
    """The daemon's CPU seconds and its sent bytes and cells, all stores together."""
    out = {"cpu": daemon.cpu_seconds(), "sent_bytes": 0.0, "cells": 0.0}
    for name, value in _COUNTER.findall(daemon.metrics()):
        out[name] += float(value)
    return out


def run_round(daemon: Daemon, wire: Wire, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """One trainer streaming ``wire`` for ``args.seconds``; return the round's figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "client", "--address", daemon.address]
    cmd += [*loader_flags(args), "--seed", str(seed), "--seconds", str(args.seconds)]
    cmd += ["--encoding", wire.encoding, "--compression", wire.compression or "none"]
    (result,), used = run_synced([cmd], args.timeout, lambda: daemon_counters(daemon))
    cells = result["cells"]
    return {
        "cells_per_s": cells / (result["end"] - result["start"]),
        "trainer_us_per_cell": result["cpu_s"] / cells * 1e6,
        "daemon_us_per_cell": used["cpu"] / cells * 1e6,
        "wire_bytes_per_cell": used["sent_bytes"] / used["cells"],
    }


def timed(batches: Iterator[tuple[int, float]], seconds: float) -> Iterator[tuple[int, float]]:
    """The first item, then items until ``seconds`` after the second was asked for.

    :func:`synced_stream` takes the first before its measured stretch starts and asks
    for the second when it starts.
    """
    yield next(batches)
    end = time.monotonic() + seconds
    for item in batches:
        yield item
        if time.monotonic() >= end:
            return


def run_client(argv: list[str]) -> int:
    """A trainer: RemoteLoader over gRPC in one wire format, epoch after epoch."""
    p = client_parser("bench_links.py client", max_cells=sys.maxsize)
    p.add_argument("--encoding", required=True)
    p.add_argument("--compression", required=True)
    p.add_argument("--seconds", type=float, required=True)
    args = p.parse_args(argv)
    from annserve.client import Connection, Output, RemoteLoader

    compression = None if args.compression == "none" else args.compression
    loader = RemoteLoader(
        args.address,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        preload_nchunks=args.preload_nchunks,
        shuffle=True,
        seed=args.seed,
        output=Output(to_torch=True),
        connection=Connection(transport="grpc", encoding=args.encoding, compression=compression),
    )

    def epochs() -> Iterator[tuple[int, float]]:
        for epoch in itertools.count():
            loader.set_epoch(epoch)
            yield from batch_sums(loader)

    return synced_stream(timed(epochs(), args.seconds), args.max_cells)


def warm_page_cache(store: Path) -> None:
    """Read every file of the store once, so that no round reads from disk."""
    for path in [store] if store.is_file() else sorted(store.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(16 << 20):
                    pass


def median_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over the repetitions."""
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def table(
    store: str, links: list[Link], wires: list[Wire], med: dict[tuple[Link, Wire], dict[str, float]]
) -> list[str]:
    """The markdown table: one row per (link, wire), with each row's share of its link's best."""
    lines = [
        "| store | link | encoding | compression | cells/s | of link's fastest | wire B/cell "
        "| wire MB/s | trainer CPU µs/cell | daemon CPU µs/cell |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for link in links:
        best = max(med[link, w]["cells_per_s"] for w in wires)
        for w in wires:
            m = med[link, w]
            lines.append(
                f"| {store} | {link.name} | {w.encoding} | {w.compression or 'none'} "
                f"| {m['cells_per_s']:,.0f} | {m['cells_per_s'] / best:.2f} "
                f"| {m['wire_bytes_per_cell']:,.0f} "
                f"| {m['cells_per_s'] * m['wire_bytes_per_cell'] / 1e6:,.0f} "
                f"| {m['trainer_us_per_cell']:.1f} | {m['daemon_us_per_cell']:.1f} |"
            )
    return lines


def fastest(links: list[Link], wires: list[Wire], med: dict[tuple[Link, Wire], Any]) -> list[str]:
    """One line per link: its wire formats from fastest to slowest."""
    lines = []
    for link in links:
        ranked = sorted(wires, key=lambda w: -med[link, w]["cells_per_s"])
        best = med[link, ranked[0]]["cells_per_s"]
        order = ", ".join(f"{w.name} {med[link, w]['cells_per_s'] / best:.2f}" for w in ranked)
        lines.append(f"- {link.name}: {order}")
    return lines


def measure(
    daemon: Daemon, links: list[Link], wires: list[Wire], args: argparse.Namespace
) -> dict[tuple[Link, Wire], list[dict[str, float]]]:
    """Every (link, wire) round of every repetition, interleaved; each round a new seed."""
    seeds = itertools.count()
    shaped: list[Link] = []  # the link the loopback has now, once set

    def run(key: tuple[Link, Wire]) -> dict[str, float]:
        if shaped[-1:] != [key[0]]:
            set_link(key[0])
            shaped.append(key[0])
        return run_round(daemon, key[1], next(seeds), args)

    def say(key: tuple[Link, Wire], r: dict[str, float]) -> str:
        return f"{key[0].name} {key[1].name}: {r['cells_per_s']:,.0f} cells/s"

    return interleaved([(link, w) for link in links for w in wires], args.reps, run, say)


def run_inside(args: argparse.Namespace, command: str) -> int:
    """The benchmark, in the namespace: daemon, rounds, table; return the exit code."""
    links = [Link(None)] + [Link(float(r)) for r in args.rates.split(",")]
    wires = parse_wire(args.wire)
    store = args.store.name
    warm_page_cache(args.store)
    load0, t0 = os.getloadavg(), time.monotonic()
    daemon = Daemon(args.store, metrics=True)
    try:
        probes = {link: probe_link(link) for link in links}
        rounds = measure(daemon, links, wires, args)
    finally:
        daemon.stop()
        set_link(Link(None))
    med = {k: median_figures(v) for k, v in rounds.items()}
    head = [
        "# RemoteLoader over bandwidth-limited links",
        "",
        f"`{command}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load "
        f"average {load0[0]:.1f} at the start and {os.getloadavg()[0]:.1f} at the end, "
        f"{time.monotonic() - t0:.0f} s.",
        "",
        f"Store `{args.store}`; batch {args.batch_size}, chunk {args.chunk_size} x preload "
        f"{args.preload_nchunks}, shuffled, X as torch sparse CSR (float32), TCP on the "
        f"namespace's 127.0.0.1, `annserve --workers 1`; {args.seconds:g} s per round, "
        f"medians of {args.reps} interleaved repetitions.",
        "",
        "Links (`tc qdisc replace dev lo root ...`; probe: one plain TCP socket, 1 s):",
        "",
        *(
            f"- {link.name}: "
            f"{'no qdisc' if link.gbit is None else '`' + ' '.join(link.tbf()) + '`'}, "
            f"probe {probes[link]:.1f} Gbit/s"
            for link in links
        ),
        "",
    ]
    text = [*head, *table(store, links, wires, med), "", "Fastest first, per link:", ""]
    text += fastest(links, wires, med)
    print("\n".join(text))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(text) + "\n")
        print(f"\nwrote {args.out}")
    if args.json is not None:
        raw = {f"{k[0].name} {k[1].name}": v for k, v in rounds.items()}
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def missing_tools() -> str:
    """Why this machine cannot run the benchmark, or empty."""
    if os.geteuid() != 0:
        return "needs root (ip netns, tc)"
    lacking = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    return f"needs {' and '.join(lacking)} (iproute2)" if lacking else ""


def run_outside(argv: list[str]) -> int:
    """Make the namespace, run the benchmark in it, remove the namespace and its qdisc."""
    if why := missing_tools():
        print(f"bench_links: skipped: {why}")
        return 0
    ns = f"annserve-bench-{os.getpid()}"
    inside = [sys.executable, str(Path(__file__).resolve()), "inside", *argv]
    signal.signal(signal.SIGTERM, _interrupt)
    child = None
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        # its own process group: Ctrl-C (or SIGTERM) here reaches it, its daemon and its
        # trainers through one killpg below, whichever group the terminal signalled
        child = subprocess.Popen(["ip", "netns", "exec", ns, *inside], start_new_session=True)
        return child.wait()
    except KeyboardInterrupt:
        print("bench_links: interrupted", file=sys.stderr)
        return 130
    finally:
        if child is not None:
            stop_group(child)
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
        sh("ip", "netns", "del", ns, check=False)


def stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGINT the process group ``child`` leads, unless it ended; SIGKILL what is left."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGINT)
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    with contextlib.suppress(ProcessLookupError):  # a trainer or daemon it left behind
        os.killpg(child.pid, signal.SIGKILL)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True, help="store the daemon serves")
    p.add_argument(
        "--rates",
        default="25,10,2.5,1",
        help="comma-separated link rates, Gbit/s; an unshaped row always comes first "
        "(default %(default)s)",
    )
    p.add_argument(
        "--wire",
        default=DEFAULT_WIRE,
        help="comma-separated encoding:compression pairs (default %(default)s)",
    )
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per round")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a trainer may take")
    add_loader_args(p, helps=True)
    p.add_argument("--out", type=Path, default=RESULTS, help="markdown table (%(default)s)")
    p.add_argument("--json", type=Path, help="write every round's figures here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch: ``client ...`` (a trainer), ``inside ...`` (in the namespace), or the run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return run_client(argv[1:])
    if argv[:1] == ["inside"]:
        signal.signal(signal.SIGTERM, _interrupt)
        command = " ".join(["python", "benchmarks/bench_links.py", *argv[1:]])
        try:
            return run_inside(build_parser().parse_args(argv[1:]), command)
        except KeyboardInterrupt:  # the daemon is stopped; the caller removes the namespace
            return 130
    build_parser().parse_args(argv)  # bad arguments fail before the namespace exists
    return run_outside(argv)


if __name__ == "__main__":
    sys.exit(main())
