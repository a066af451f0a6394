"""deploy/: static checks of the compose file and Dockerfile, and the image's commands run here.

No Docker engine is needed: the image's ENTRYPOINT + CMD (with its ENV) and its
HEALTHCHECK command are run as local subprocesses against a real store, on
loopback and an ephemeral port.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shlex
import shutil
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

from annserve.server.rpc.cli import build_parser, env_var
from annserve.v1 import annserve_pb2 as pb
from annserve.wire import decode_frame
from ops_support import annserve_command

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DATA = ROOT.parent / "shared" / "data"
STORE = DATA / "pbmc3k_raw.h5ad"
IMAGE_STORE = "/data/store.h5ad"
README = ROOT / "README.md"
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
    return dockerfile[froms[-1] :]


def stages(dockerfile: list[Instruction]) -> dict[str, list[Instruction]]:
    """Each named stage's instructions (``FROM image AS name`` up to the next FROM)."""
    named: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for keyword, rest in dockerfile:
        if keyword == "FROM":
            current = []
            words = rest.split()
            if len(words) == 3 and words[1].upper() == "AS":
                named[words[2]] = current
        current.append((keyword, rest))
    return named


def stage_name(dockerfile: list[Instruction], stage: list[Instruction]) -> str:
    return next(name for name, body in stages(dockerfile).items() if body == stage)


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


def daemons(services: dict) -> dict[str, dict]:
    """The services running the daemon's image: ``annserve`` and its replicas."""
    image = services["annserve"]["image"]
    return {name: s for name, s in services.items() if s.get("image") == image}


def test_daemon_volumes_are_read_only(services):
    for name, daemon in daemons(services).items():
        volumes = daemon["volumes"]
        assert volumes, name
        assert all(volume_mode_and_target(v)[0] for v in volumes), (name, volumes)


def test_daemon_store_is_on_a_mounted_volume(services):
    for name, daemon in daemons(services).items():
        store = Path(flag(argv(daemon["command"]), "--store"))
        targets = [Path(volume_mode_and_target(v)[1]) for v in daemon["volumes"]]
        assert any(store.is_relative_to(target) for target in targets), (name, store, targets)


def trainers(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name.startswith("trainer")}


def daemon_port(daemon: dict, dockerfile: list[Instruction]) -> str:
    """A daemon's port in compose: its --port flag, else ANNSERVE_PORT, else the image's."""
    args = argv(daemon.get("command", []))
    if "--port" in args:
        return flag(args, "--port")
    return str(
        daemon.get("environment", {}).get("ANNSERVE_PORT", image_env(dockerfile)["ANNSERVE_PORT"])
    )


def annserve_port(services: dict, dockerfile: list[Instruction]) -> str:
    """The ``annserve`` service's port in compose."""
    return daemon_port(services["annserve"], dockerfile)


def addressed_service(trainer: dict) -> tuple[str, str]:
    """(service name, port) a trainer's ``--address`` names: ``NAME:PORT`` or ``dns:///NAME:PORT``."""
    address = flag(argv(trainer["command"]), "--address").removeprefix("dns:///")
    host, _, port = address.rpartition(":")
    return host, port


def test_trainers_wait_for_the_healthy_daemon_they_address(services, dockerfile):
    for name, trainer in trainers(services).items():
        daemon, _ = addressed_service(trainer)
        assert daemon in daemons(services), (name, daemon)
        waits = trainer.get("depends_on", {}).get(daemon, {})
        assert waits.get("condition") == "service_healthy", (name, trainer.get("depends_on"))
        # a healthcheck in a trainer would probe a daemon that is not there
        stage = stages(dockerfile)[trainer["build"]["target"]]
        assert trainer.get("healthcheck", {}).get("disable") is True or not any(
            keyword == "HEALTHCHECK" for keyword, _ in stage
        ), name


def test_compose_builds_the_daemon_from_the_final_stage(services, dockerfile):
    """`docker build` without --target gives the image that compose runs as the daemon,
    so the final-stage checks below are checks of the daemon's image."""
    build = services["annserve"]["build"]
    assert (ROOT / "deploy" / build["context"] / build["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )
    assert build.get("target", stage_name(dockerfile, final_stage(dockerfile))) == stage_name(
        dockerfile, final_stage(dockerfile)
    )


def test_trainers_build_their_own_stage_and_image(services, dockerfile):
    daemon_image = services["annserve"]["image"]
    for name, trainer in trainers(services).items():
        target = trainer["build"]["target"]
        assert target in stages(dockerfile), (name, target)
        assert stages(dockerfile)[target] != final_stage(dockerfile), name
        assert trainer["image"] != daemon_image, name  # two stages, two images


def pip_installs(stage: list[Instruction]) -> list[str]:
    return [rest for keyword, rest in stage if keyword == "RUN" and "pip install" in rest]


def test_daemon_image_installs_the_server_extra_and_no_torch(dockerfile):
    installs = pip_installs(final_stage(dockerfile))
    assert any("[server]" in run for run in installs), installs
    stage_text = " ".join(rest for _, rest in final_stage(dockerfile))
    assert "torch" not in stage_text  # the daemon never imports it (tests/system/test_package.py)
    copies = [rest for keyword, rest in final_stage(dockerfile) if keyword == "COPY"]
    assert not any("examples" in copy for copy in copies), copies  # the trainers' scripts


def test_trainer_image_has_cpu_torch_the_client_and_the_examples(services, dockerfile):
    stage = stages(dockerfile)[services["trainer"]["build"]["target"]]
    installs = pip_installs(stage)
    torch = [i for i, run in enumerate(installs) if "torch==2.13.0" in run]
    client = [i for i, run in enumerate(installs) if "[client]" in run]
    assert torch, installs
    assert client, installs
    # torch first and from the CPU index: the client extra alone would pull CUDA torch
    assert torch[0] < client[0]
    assert "download.pytorch.org/whl/cpu" in installs[torch[0]]
    copies = [rest.split() for keyword, rest in stage if keyword == "COPY"]
    script = argv(services["trainer"]["entrypoint"])[-1]
    assert any(Path(script).is_relative_to(c[0].rstrip("/")) for c in copies), copies
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users, "trainer stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_trainer_address_is_a_daemon_service(services, dockerfile):
    for name, trainer in trainers(services).items():
        daemon, port = addressed_service(trainer)
        assert daemon in daemons(services), name
        assert port == daemon_port(services[daemon], dockerfile), name
    assert addressed_service(services["trainer"])[0] == "annserve"


def test_multi_profile_has_several_trainers_sharing_one_server(services):
    multi = [n for n, s in trainers(services).items() if "multi" in s.get("profiles", [])]
    assert len(multi) >= 2, multi
    seeds = {flag(argv(services[n]["command"]), "--seed") for n in multi}
    assert len(seeds) == len(multi)  # each trainer its own shuffle
    assert "profiles" not in services["annserve"]  # the one server runs in every profile
    assert "profiles" not in services["trainer"]  # the default profile trains too


def replica_services(services: dict) -> dict[str, dict]:
    return {n: s for n, s in daemons(services).items() if "replicas" in s.get("profiles", [])}


def test_replicas_profile_runs_several_daemons_of_one_store(services):
    replicas = replica_services(services)
    assert len(replicas) == 1, replicas  # one service scaled, so one DNS name for all
    (replica,) = replicas.values()
    assert replica["deploy"]["replicas"] >= 2
    # the same store, read-only, as the one daemon: every replica serves the same content
    assert replica["volumes"] == services["annserve"]["volumes"]
    assert flag(argv(replica["command"]), "--store") == flag(
        argv(services["annserve"]["command"]), "--store"
    )


def test_replicas_have_the_image_healthcheck(services, dockerfile):
    """Trainers wait for every replica's gRPC health check (the daemon image's HEALTHCHECK)."""
    assert healthcheck_command(dockerfile)[0] == "annserve-health"
    for name, replica in replica_services(services).items():
        assert replica["build"] == services["annserve"]["build"], name
        assert replica.get("healthcheck", {}).get("disable") is not True, name
        assert "test" not in replica.get("healthcheck", {}), name  # the image's, not another


def test_replicas_publish_no_fixed_host_port(services):
    """Replicas of one service cannot share a host port or a container name."""
    for name, replica in replica_services(services).items():
        assert "container_name" not in replica, name
        for port in replica.get("ports", []):
            published = port.get("published") if isinstance(port, dict) else None
            if isinstance(port, str | int):
                parts = str(port).split(":")
                published = parts[-2] if len(parts) > 1 else None
            assert not published, (name, port)


def test_replicas_profile_trains_with_ddp_through_the_dns_name(services, dockerfile):
    (replica,) = replica_services(services)
    ddp = [s for s in trainers(services).values() if "replicas" in s.get("profiles", [])]
    assert ddp
    port = daemon_port(services[replica], dockerfile)
    for trainer in ddp:
        # the name compose's DNS answers with every replica's address, named as a
        # dns:/// target (deploy/README.md, "Several replicas")
        assert flag(argv(trainer["command"]), "--address") == f"dns:///{replica}:{port}"
        assert "torchrun" in argv(trainer["entrypoint"])[0]


def test_daemon_environment_names_real_flags(services):
    known = {env_var(a.option_strings[0]) for a in build_parser()._actions if a.option_strings}
    for name, daemon in daemons(services).items():
        assert set(daemon.get("environment", {})) <= known, name


def test_stop_grace_period_outlasts_the_drain(services):
    for name, daemon in daemons(services).items():
        grace = float(daemon["environment"].get("ANNSERVE_GRACE", 5))
        period = daemon["stop_grace_period"]
        assert period.endswith("s"), name
        assert float(period[:-1]) > grace + 1, name  # shutdown takes up to grace + 1 s


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose (Debian package) not installed"
)
@pytest.mark.parametrize("profile", [None, "multi", "replicas"])
def test_docker_compose_config_accepts_the_file(profile):
    args = ["docker-compose", "-f", str(DEPLOY / "compose.yaml")]
    args += ["--profile", profile] if profile else []
    done = subprocess.run(
        [*args, "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "ANNSERVE_DATA": str(DATA)},
    )
    assert done.returncode == 0, done.stderr
    assert {"annserve", "trainer", "trainer-2"} <= set(done.stdout.split())
    if profile == "replicas":
        assert {"annserve-replica", "trainer-ddp"} <= set(done.stdout.split())


@pytest.mark.parametrize("name", ["trainer", "trainer-ddp"])
def test_trainer_command_parses(services, monkeypatch, name):
    trainer = services[name]
    script = ROOT / next(arg for arg in argv(trainer["entrypoint"]) if arg.endswith(".py"))
    monkeypatch.syspath_prepend(str(script.parent))  # train_ddp.py imports train.py
    spec = importlib.util.spec_from_file_location(f"annserve_example_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(argv(trainer["command"]))
    assert args.address == flag(argv(trainer["command"]), "--address")


def test_dockerfile_is_multi_stage(dockerfile):
    assert sum(keyword == "FROM" for keyword, _ in dockerfile) >= 2


def test_dockerfile_runs_as_non_root(dockerfile):
    users = [rest for keyword, rest in final_stage(dockerfile) if keyword == "USER"]
    assert users, "final stage has no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


def image_env(dockerfile: list[Instruction]) -> dict[str, str]:
    """The final stage's ENV variables (``ENV KEY=VALUE ...`` form)."""
    env = {}
    for keyword, rest in final_stage(dockerfile):
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {rest!r}: use the KEY=VALUE form"
                env[key] = value
    return env


def healthcheck_command(dockerfile: list[Instruction]) -> list[str]:
    """The final stage's HEALTHCHECK command, which must be in exec (JSON array) form."""
    checks = [rest for keyword, rest in final_stage(dockerfile) if keyword == "HEALTHCHECK"]
    assert checks, "final stage has no HEALTHCHECK"
    options, sep, command = checks[-1].partition("CMD ")
    assert sep, f"HEALTHCHECK {checks[-1]!r} has no CMD"
    assert "--timeout=" in options
    assert "--interval=" in options
    form = json.loads(command)
    assert isinstance(form, list), "HEALTHCHECK CMD is not in exec (JSON array) form"
    return form


def test_dockerfile_entrypoint_and_port(dockerfile):
    assert exec_form(dockerfile, "ENTRYPOINT") == ["annserve"]
    exposed = [rest for keyword, rest in final_stage(dockerfile) if keyword == "EXPOSE"]
    assert image_env(dockerfile)["ANNSERVE_PORT"] in exposed
    assert "--port" not in exec_form(dockerfile, "CMD")  # the healthcheck reads ANNSERVE_PORT


def test_dockerfile_healthcheck_uses_the_grpc_health_probe(dockerfile):
    command = healthcheck_command(dockerfile)
    assert command[0] == "annserve-health"
    assert (ROOT / "pyproject.toml").read_text().count('annserve-health = "') == 1


def console_script(name: str) -> list[str]:
    """A console script of this package next to this interpreter."""
    script = Path(sys.executable).with_name(name)
    assert script.exists(), f"{script} missing: reinstall the package (pip install -e .)"
    return [str(script)]


def local_command(image_argv: list[str]) -> list[str]:
    """The image's ENTRYPOINT + CMD made to run here: real store, loopback, ephemeral port."""
    swap = {IMAGE_STORE: str(STORE), "0.0.0.0": "127.0.0.1"}
    args = [swap.get(arg, arg) for arg in image_argv[1:]]
    if "--port" in args:
        args[args.index("--port") + 1] = "0"
    return [*annserve_command(), *args]


def local_env(dockerfile: list[Instruction], **overrides: str) -> dict[str, str]:
    """This environment plus the image's ENV made to work here (store, loopback, port 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
    swap = {IMAGE_STORE: str(STORE), "0.0.0.0": "127.0.0.1"}
    env.update({k: swap.get(v, v) for k, v in image_env(dockerfile).items()})
    env["ANNSERVE_PORT"] = "0"
    return {**env, **overrides}


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
def spawn(
    command: list[str], env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """Run ``command``, its stderr lines fed to a queue (None at EOF); kill it on exit."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
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
    pytest.fail(
        f"no 'listening on 127.0.0.1:PORT' line (waited up to {timeout} s); "
        f"stderr:\n{''.join(seen)}"
    )


def describe(address: str) -> pb.StoreInfo:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/annserve.v1.AnnServe/DescribeStore",
            request_serializer=pb.DescribeStoreRequest.SerializeToString,
            response_deserializer=pb.StoreInfo.FromString,
        )
        return call(pb.DescribeStoreRequest(), timeout=RPC_TIMEOUT)


def test_image_command_serves_and_stops_on_sigterm(dockerfile):
    if not STORE.exists():
        pytest.skip(f"real dataset {STORE} not present")
    command = local_command(exec_form(dockerfile, "ENTRYPOINT") + exec_form(dockerfile, "CMD"))
    with spawn(command, local_env(dockerfile)) as (proc, lines):
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
    done = subprocess.run(
        [*annserve_command(), "--store", str(missing)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 3
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert str(missing) in done.stderr


def run_healthcheck(dockerfile: list[Instruction], port: int) -> subprocess.CompletedProcess[str]:
    """Run the image's exact HEALTHCHECK command with the image's ENV, the port swapped."""
    command = healthcheck_command(dockerfile)
    return subprocess.run(
        [*console_script(command[0]), *command[1:]],
        env=local_env(dockerfile, ANNSERVE_PORT=str(port)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def open_stream(channel: grpc.Channel, **fields) -> grpc.Call:
    call = channel.unary_stream(
        "/annserve.v1.AnnServe/StreamBatches",
        request_serializer=pb.StreamBatchesRequest.SerializeToString,
    )
    return call(pb.StreamBatchesRequest(**fields), timeout=60)


def test_healthcheck_command_serving_then_not_serving_while_draining(dockerfile):
    """SERVING once up; on SIGTERM NOT_SERVING while a stream drains; the stream completes."""
    if not STORE.exists():
        pytest.skip(f"real dataset {STORE} not present")
    command = local_command(exec_form(dockerfile, "ENTRYPOINT") + exec_form(dockerfile, "CMD"))
    env = local_env(dockerfile, ANNSERVE_GRACE="30")
    with spawn(command, env) as (proc, lines):
        port = wait_for_port(lines, START_TIMEOUT)
        healthy = run_healthcheck(dockerfile, port)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert "SERVING" in healthy.stdout
        info = describe(f"127.0.0.1:{port}")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = open_stream(
                channel, batch_size=16, chunk_size=16, preload_nchunks=4, shuffle=True, seed=1
            )
            frames = [next(stream)]  # in flight, then paused
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (check := run_healthcheck(dockerfile, port)).returncode == 0:
                assert time.monotonic() < deadline, "still SERVING 10 s after SIGTERM"
            assert "NOT_SERVING" in check.stdout, check.stdout
            with pytest.raises(grpc.RpcError) as refused:  # draining: no new streams
                next(open_stream(channel, batch_size=16, chunk_size=16, preload_nchunks=4))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in refused.value.details()
            frames += list(stream)  # the in-flight stream finishes within the grace
        rows = sum(decode_frame(f).header.n_rows for f in frames)
        assert rows == info.n_obs
        assert proc.wait(timeout=STOP_TIMEOUT) == 0, drain(lines)
    gone = run_healthcheck(dockerfile, port)
    assert gone.returncode == 1
    assert "UNAVAILABLE" in gone.stdout
