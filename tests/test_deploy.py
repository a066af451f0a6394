"""deploy/: static checks of the compose file and Dockerfile, and the image's command run here.

No Docker engine is needed: the image's ENTRYPOINT + CMD is run as a local
subprocess against a real store, on loopback and an ephemeral port.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING

import grpc
import pytest
import yaml

from annserve.v1 import annserve_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DATA = ROOT.parent / "shared" / "data"
STORE = DATA / "pbmc3k_raw.h5ad"
IMAGE_STORE = "/data/store.h5ad"
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 30.0  # seconds until the daemon logs its address
STOP_TIMEOUT = 15.0  # seconds from SIGTERM to exit
RPC_TIMEOUT = 10.0  # seconds

Instruction = tuple[str, str]
Lines = queue.Queue[str | None]


def instructions(text: str) -> list[Instruction]:
    """Return (KEYWORD, arguments) pairs, comments dropped and continuation lines joined."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    pairs = []
    for line in re.sub(r"\\\s*\n", " ", code).splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword:
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def final_stage(dockerfile: list[Instruction]) -> list[Instruction]:
    froms = [i for i, (keyword, _) in enumerate(dockerfile) if keyword == "FROM"]
    return dockerfile[froms[-1]:]


def exec_form(dockerfile: list[Instruction], keyword: str) -> list[str]:
    """Return the JSON array of the final stage's last ``keyword`` instruction."""
    values = [rest for k, rest in final_stage(dockerfile) if k == keyword]
    assert values, f"final stage has no {keyword}"
    form = json.loads(values[-1])
    assert isinstance(form, list), f"{keyword} is not in exec (JSON array) form"
    assert all(isinstance(arg, str) for arg in form)
    return form


def argv(value: str | list[object]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(arg) for arg in value]


def flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def volume_mode_and_target(volume: str | dict) -> tuple[bool, str]:
    """Return whether a compose volume is read-only, and its path in the container."""
    if isinstance(volume, dict):
        return volume.get("read_only") is True, volume["target"]
    parts = volume.rsplit(":", 2)
    read_only = len(parts) == 3 and "ro" in parts[2].split(",")
    return read_only, parts[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return instructions((DEPLOY / "Dockerfile").read_text())


def test_compose_has_both_services(services):
    assert {"annserve", "trainer"} <= set(services)


def test_annserve_volumes_are_read_only(services):
    volumes = services["annserve"]["volumes"]
    assert volumes
    assert all(volume_mode_and_target(v)[0] for v in volumes), volumes


def test_annserve_store_is_on_a_mounted_volume(services):
    store = Path(flag(argv(services["annserve"]["command"]), "--store"))
    targets = [Path(volume_mode_and_target(v)[1]) for v in services["annserve"]["volumes"]]
    assert any(store.is_relative_to(target) for target in targets), (store, targets)


def test_trainer_depends_on_annserve(services):
    assert "annserve" in services["trainer"]["depends_on"]


def test_trainer_address_is_annserve_service(services):
    host, _, port = flag(argv(services["trainer"]["command"]), "--address").rpartition(":")
    assert host == "annserve"
    assert port == flag(argv(services["annserve"]["command"]), "--port")


def test_trainer_command_parses(services, monkeypatch):
    script = ROOT / argv(services["trainer"]["entrypoint"])[-1]
    if not script.exists():
        pytest.skip(f"{script} not written yet")
    spec = importlib.util.spec_from_file_location("annserve_example_train", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(argv(services["trainer"]["command"]))
    assert args.address == "annserve:50051"


def test_dockerfile_is_multi_stage(dockerfile):
    assert sum(keyword == "FROM" for keyword, _ in dockerfile) >= 2


def test_dockerfile_runs_as_non_root(dockerfile):
    users = [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_entrypoint_and_port(dockerfile):
    assert exec_form(dockerfile, "ENTRYPOINT") == ["annserve"]
    exposed = [rest for keyword, rest in final_stage(dockerfile) if keyword == "EXPOSE"]
    assert flag(exec_form(dockerfile, "CMD"), "--port") in exposed


def annserve_command() -> list[str]:
    """The ``annserve`` console script next to this interpreter, or its module."""
    script = Path(sys.executable).with_name("annserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "annserve.server.cli"]


def local_command(image_argv: list[str]) -> list[str]:
    """The image's ENTRYPOINT + CMD made to run here: real store, loopback, ephemeral port."""
    swap = {IMAGE_STORE: str(STORE), "0.0.0.0": "127.0.0.1"}
    args = [swap.get(arg, arg) for arg in image_argv[1:]]
    args[args.index("--port") + 1] = "0"
    return [*annserve_command(), *args]


def pump(stream: IO[str], lines: Lines) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def drain(lines: Lines) -> str:
    text = []
    while not lines.empty():
        text.append(lines.get_nowait() or "")
    return "".join(text)


@contextmanager
def spawn(command: list[str]) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """Run ``command``, its stderr lines fed to a queue (None at EOF); kill it on exit."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: Lines = queue.Queue()
    reader = threading.Thread(target=pump, args=(proc.stderr, lines), daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        reader.join(timeout=STOP_TIMEOUT)
        proc.stderr.close()


def wait_for_port(lines: Lines, timeout: float) -> int:
    """Return the port of the daemon's ``listening on`` log line, waiting at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    seen = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if match := LISTENING.search(line):
            return int(match.group(1))
    pytest.fail(f"no 'listening on 127.0.0.1:PORT' line (waited up to {timeout} s); "
                f"stderr:\n{''.join(seen)}")


def describe(address: str) -> pb.StoreInfo:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/annserve.v1.AnnServe/DescribeStore",
                                   request_serializer=pb.DescribeStoreRequest.SerializeToString,
                                   response_deserializer=pb.StoreInfo.FromString)
        return call(pb.DescribeStoreRequest(), timeout=RPC_TIMEOUT)


def test_image_command_serves_and_stops_on_sigterm(dockerfile):
    if not STORE.exists():
        pytest.skip(f"real dataset {STORE} not present")
    command = local_command(exec_form(dockerfile, "ENTRYPOINT") + exec_form(dockerfile, "CMD"))
    with spawn(command) as (proc, lines):
        port = wait_for_port(lines, START_TIMEOUT)
        assert port > 0
        info = describe(f"127.0.0.1:{port}")
        assert info.name == STORE.stem  # the default store name: file name without suffix
        assert info.n_obs > 0
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT)
        assert code == 0, drain(lines)


def test_missing_store_exits_3(tmp_path):
    missing = tmp_path / "nonexistent.h5ad"
    done = subprocess.run([*annserve_command(), "--store", str(missing)], capture_output=True,
                          text=True, timeout=START_TIMEOUT, check=False)
    assert done.returncode == 3
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert str(missing) in done.stderr
