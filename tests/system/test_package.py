"""Packaging facts: committed stubs are current, each role installs and imports only its own."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("annserve_pb2.py", "annserve_pb2.pyi", "annserve_pb2_grpc.py")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# what only the daemon needs: never a requirement of `pip install annserve`, never
# imported by `import annserve.client` (tqdm is both sides': annserve convert, annserve bench)
SERVER_ONLY = (
    "anndata", "zarr", "zarrs", "h5py", "scipy", "google_crc32c", "grpc_health",
    "grpc_reflection", "prometheus_client",
)  # fmt: skip


def test_regenerating_stubs_changes_nothing(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), str(tmp_path)],
        check=True,
        timeout=120,
    )
    for name in STUBS:
        fresh = (tmp_path / "annserve" / "v1" / name).read_text()
        committed = (ROOT / "src" / "annserve" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run python tools/gen_proto.py"


def test_client_import_pulls_no_store_libraries():
    code = (
        "import sys, annserve.client; "
        "print(','.join(m for m in ('anndata', 'zarr', 'h5py', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def loaded_top_level_modules(code: str) -> set[str]:
    """Run ``code`` in a fresh interpreter; return the top-level modules it left loaded."""
    code += "\nimport sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


# a meta path finder making the named top-level modules unimportable, as if not installed
HIDE = (
    "import sys\n"
    "class Hide:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in {hidden!r}:\n"
    "            raise ModuleNotFoundError(f'No module named {{name!r}} (hidden)', name=name)\n"
    "sys.meta_path.insert(0, Hide())\n"
)


def test_client_imports_without_what_only_the_daemon_needs():
    """`import annserve.client` works where none of the daemon's libraries (nor numcodecs) is
    installed. (grpcio and torch import grpc_health, grpc_reflection and tqdm when they are
    installed, optionally: so hide them instead of checking ``sys.modules``.)"""
    hidden = (*SERVER_ONLY, "numcodecs")
    loaded = loaded_top_level_modules(
        HIDE.format(hidden=hidden) + "import annserve.client, annserve.errors, annserve.wire"
    )
    assert "annserve" in loaded
    assert "numcodecs" not in loaded  # only a stream that asks for compression imports it


def test_daemon_imports_no_torch():
    """The daemon's entry points, ``annserve --help`` and every server module load no torch."""
    code = (
        "import contextlib, io, pkgutil, importlib\n"
        "import annserve.server.rpc.cli, annserve.server.rpc.healthcheck\n"
        "from annserve.server.rpc.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "import annserve.server\n"
        "for m in pkgutil.walk_packages(annserve.server.__path__, 'annserve.server.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    loaded = loaded_top_level_modules(code)
    assert "torch" not in loaded


def distribution(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def requirements(*extras: str) -> set[str]:
    deps = set(PROJECT["dependencies"])
    for extra in extras:
        deps |= set(PROJECT["optional-dependencies"][extra])
    return {distribution(r) for r in deps}


def runtime_imports(root: Path) -> set[str]:
    """Top-level names of the absolute imports in ``root``'s modules, TYPE_CHECKING blocks
    left out (lazy imports inside functions count: they run)."""
    names = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"annserve", "__future__"}


def undeclared(roots: list[Path], declared: set[str]) -> dict[str, list[str]]:
    """Imports of ``roots`` whose installed distribution is not in ``declared``."""
    # uninstalled here (no CUDA): the distribution the gpu extra installs them from
    providers = {"cupy": ["cupy-cuda12x"], "cupyx": ["cupy-cuda12x"]}
    providers |= importlib.metadata.packages_distributions()
    missing = {}
    for name in sorted(set().union(*(runtime_imports(r) for r in roots))):
        dists = {distribution(d) for d in providers.get(name, [name])}
        if not dists & declared:
            missing[name] = sorted(dists)
    return missing


def test_trainer_install_has_no_daemon_dependency():
    trainer = requirements("client", "compression")
    assert trainer.isdisjoint(distribution(m) for m in SERVER_ONLY)
    assert "torch" not in requirements("server")  # the daemon installs without torch


def test_daemon_imports_are_declared_by_the_server_install():
    roots = [ROOT / "src" / "annserve", ROOT / "server" / "annserve"]
    assert undeclared(roots, requirements("server")) == {}


def test_client_imports_are_declared_by_the_client_install():
    roots = [ROOT / "src" / "annserve", ROOT / "client" / "annserve"]
    # annserve.client.lightning and .scvi: the lightning extra; CuPy output: the gpu extra
    assert undeclared(roots, requirements("client", "compression", "lightning", "gpu")) == {}


def test_generated_service_matches_registered_methods():
    from annserve.v1 import annserve_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["AnnServe"]
    assert {m.name for m in service.methods} == {"DescribeStore", "StreamBatches", "CountBatches"}
    assert service.full_name == "annserve.v1.AnnServe"
