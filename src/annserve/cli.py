"""The ``annserve`` console script: ``annserve bench`` on the trainer side, the rest daemon's.

``annserve bench ADDRESS ...`` runs :func:`annserve.client.bench.main` (it needs the
client install: torch); everything else (``annserve --store ...``, ``annserve convert``,
``annserve inspect``) runs :func:`annserve.server.rpc.cli.main` (the server install).
Each side is imported only when its command runs, so a trainer host without the
daemon's libraries can run ``annserve bench`` and a daemon without torch the rest.
"""

from __future__ import annotations

import sys

#: Exit code when the command's side is not installed (as a bad argument).
EXIT_NOT_INSTALLED = 2


def main(argv: list[str] | None = None) -> int:
    """Run ``annserve ...``; return the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    bench = argv[:1] == ["bench"]
    try:
        if bench:
            from annserve.client.bench import main as bench_main
        else:
            from annserve.server.rpc.cli import main as server_main
    except ImportError as e:
        side = "client" if bench else "server"
        print(f"annserve: {e}; this command needs pip install 'annserve[{side}]'", file=sys.stderr)
        return EXIT_NOT_INSTALLED
    return bench_main(argv[1:]) if bench else server_main(argv)


if __name__ == "__main__":
    sys.exit(main())
