"""Regenerate the committed Python stubs from ``proto/``.

Usage: ``python tools/gen_proto.py [OUT_DIR]`` (default: ``src``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = "annserve/v1/annserve.proto"


def generate(out_dir: Path) -> None:
    """Write ``annserve/v1/annserve_pb2{,_grpc}.py`` and ``.pyi`` under ``out_dir``.

    Raises
    ------
    RuntimeError
        If protoc fails.
    """
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "proto" / PROTO),
    ]
    if protoc.main(args) != 0:
        msg = f"protoc failed on {PROTO}"
        raise RuntimeError(msg)


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src")
