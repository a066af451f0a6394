"""deploy/k8s/: the manifests against Kubernetes' schemas, their wiring, their command run here.

No cluster runs here. Every object is validated offline with ``kubernetes-validate``
(strict: unknown fields are errors) against the newest Kubernetes schemas it bundles;
the checks below then tie the objects together (selectors, ports, probes, volumes,
security context) and to what the daemon reads (``annserve --help``'s flags and their
``ANNSERVE_*`` variables). Finally the container's command, args and env are run as a
local process with the real store, the volume paths mapped onto this machine, on
loopback with ephemeral ports: the gRPC health service the probes ask reports SERVING
without a token, the metrics endpoint answers at the annotated path, and SIGTERM stops
the daemon with exit 0.
"""

from __future__ import annotations

import copy
import os
import queue
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate.utils import latest_version
from test_deploy import DATA, LISTENING, START_TIMEOUT, STOP_TIMEOUT, Lines, drain, spawn

from annserve.server.rpc.cli import build_parser, env_var
from annserve.v1 import annserve_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DEPLOY_README = ROOT / "deploy" / "README.md"
#: The health service the probes name: the daemon's gRPC service, from its descriptor.
SERVICE = pb.DESCRIPTOR.services_by_name["AnnServe"].full_name
METRICS_LINE = re.compile(r"metrics on (http://127\.0\.0\.1:\d+)/metrics")
RPC_TIMEOUT = 10.0  # seconds
MIN_KUBERNETES = (1, 30)


def manifests() -> list[tuple[str, dict]]:
    """(file name, object) for every object of every manifest in deploy/k8s/."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj is not None:
                found.append((path.name, obj))
    return found


def kubernetes_objects() -> list[tuple[str, dict]]:
    return [(name, obj) for name, obj in manifests() if obj["kind"] != "Kustomization"]


def one(kind: str) -> dict:
    objects = [obj for _, obj in kubernetes_objects() if obj["kind"] == kind]
    assert len(objects) == 1, f"{len(objects)} {kind} objects in deploy/k8s"
    return objects[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return one("Deployment")


@pytest.fixture(scope="module")
def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod: dict) -> dict:
    containers = pod["spec"]["containers"]
    assert [c["name"] for c in containers] == ["annserve"]
    return containers[0]


@pytest.fixture(scope="module")
def env(container: dict) -> dict[str, str]:
    pairs = container["env"]
    assert all(set(pair) == {"name", "value"} for pair in pairs), pairs  # literal values
    return {pair["name"]: pair["value"] for pair in pairs}


def container_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert name in ports, ports
    return ports[name]


def mounts(container: dict, pod: dict) -> dict[str, tuple[dict, dict]]:
    """mountPath -> (volumeMount, volume) of the container."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def mount_of(path: str, container: dict, pod: dict) -> tuple[dict, dict]:
    """The volume mount holding ``path`` (the deepest one)."""
    holding = [p for p in mounts(container, pod) if Path(path).is_relative_to(p)]
    assert holding, f"{path} is on no volume"
    return mounts(container, pod)[max(holding, key=len)]


def wait_for_addresses(lines: Lines, timeout: float) -> tuple[int, str]:
    """The port of ``listening on 127.0.0.1:PORT`` and the metrics URL logged before it."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if match := LISTENING.search(line):
            metrics = METRICS_LINE.search("".join(seen))
            assert metrics, f"no metrics address logged; stderr:\n{''.join(seen)}"
            return int(match.group(1)), metrics.group(1)
    pytest.fail(f"no 'listening on' line (waited up to {timeout} s); stderr:\n{''.join(seen)}")


def test_bundled_schemas_are_a_current_kubernetes():
    version = tuple(int(part) for part in latest_version().split(".")[:2])
    assert version >= MIN_KUBERNETES, latest_version()


def test_every_object_has_api_version_kind_and_name():
    assert manifests()
    for name, obj in manifests():
        assert {"apiVersion", "kind"} <= set(obj), name
        if obj["kind"] != "Kustomization":
            assert obj["metadata"]["name"], name
            assert "namespace" not in obj["metadata"], name  # chosen at apply time (-n)


@pytest.mark.parametrize(
    "obj",
    [obj for _, obj in kubernetes_objects()],
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}",
)
def test_object_validates_against_the_kubernetes_schema(obj):
    version = kubernetes_validate.validate(obj, latest_version(), strict=True)
    assert tuple(int(part) for part in version.split(".")) >= MIN_KUBERNETES


def test_the_validator_rejects_a_misspelled_field(deployment):
    """The schema check above is strict: a typo in a probe's name is an error, not ignored."""
    broken = copy.deepcopy(deployment)
    spec = broken["spec"]["template"]["spec"]["containers"][0]
    spec["readinesProbe"] = spec.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, latest_version(), strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {image["name"] for image in kustomization.get("images", [])}
    assert images == {
        c["image"].split(":")[0]
        for c in one("Deployment")["spec"]["template"]["spec"]["containers"]
    }


def test_deployment_runs_several_replicas_selected_by_its_pod_labels(deployment, pod):
    assert deployment["spec"]["replicas"] >= 2
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_probes_are_native_grpc_on_the_daemon_port(container, env):
    port = int(env["ANNSERVE_PORT"])
    assert container_port(container, "grpc") == port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": SERVICE}, probe
    assert SERVICE == "annserve.v1.AnnServe"


def test_liveness_does_not_kill_a_draining_replica(container, pod):
    """The health service is NOT_SERVING while draining: liveness may fail only after the
    termination grace period would have ended the pod anyway."""
    live = container["livenessProbe"]
    assert (
        live["periodSeconds"] * live["failureThreshold"]
        > pod["spec"]["terminationGracePeriodSeconds"]
    )


def test_termination_grace_outlasts_the_drain(pod, env):
    grace = float(env["ANNSERVE_GRACE"])
    # one process stops within grace + 1 s; with --workers N the supervisor kills a worker
    # that has not stopped within grace + 6 s (README, "Exit codes")
    margin = 6 if int(env.get("ANNSERVE_WORKERS", "1")) != 1 else 1
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + margin


def test_security_context_is_non_root_with_a_read_only_root(pod, container):
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] != 0
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert "privileged" not in context or context["privileged"] is False


def test_tmp_is_a_writable_empty_dir(container, pod):
    """The root filesystem is read-only; the supervisor of --workers makes its metrics
    directory with tempfile (and a --unix socket would go there)."""
    mount, volume = mounts(container, pod)["/tmp"]
    assert "emptyDir" in volume
    assert mount.get("readOnly", False) is False


def test_store_is_on_a_read_only_volume(container, pod, env):
    stores = [spec.rpartition("=")[2] for spec in env["ANNSERVE_STORE"].split(",")]
    for store in stores:
        mount, volume = mount_of(store, container, pod)
        assert mount["readOnly"] is True, store
        claim = volume["persistentVolumeClaim"]
        assert claim["readOnly"] is True
        pvc = one("PersistentVolumeClaim")
        assert claim["claimName"] == pvc["metadata"]["name"]
        assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]  # every replica mounts it


def test_token_file_comes_from_a_secret(container, pod, env):
    token = env["ANNSERVE_TOKEN_FILE"]
    mount, volume = mount_of(token, container, pod)
    assert mount["readOnly"] is True
    key = Path(token).relative_to(mount["mountPath"]).as_posix()
    secret = volume["secret"]["secretName"]
    assert key == "token"
    # the Secret is created by hand (deploy/README.md), never committed with a token
    assert not any(obj["kind"] == "Secret" for _, obj in kubernetes_objects())
    assert f"kubectl create secret generic {secret} --from-file={key}=" in DEPLOY_README.read_text()


def test_env_names_real_flags(env):
    known = {env_var(a.option_strings[0]) for a in build_parser()._actions if a.option_strings}
    assert set(env) <= known, set(env) - known


def test_env_values_parse_as_the_daemon_would(env, monkeypatch):
    for name in list(os.environ):
        if name.startswith("ANNSERVE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args([])
    assert args.host == "0.0.0.0"  # reachable from other pods
    assert args.port == int(env["ANNSERVE_PORT"])
    assert args.metrics_port == int(env["ANNSERVE_METRICS_PORT"])


def test_metrics_port_is_annotated_for_prometheus(pod, container, env):
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == env["ANNSERVE_METRICS_PORT"]
    assert container_port(container, "metrics") == int(env["ANNSERVE_METRICS_PORT"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_resources_have_requests_and_limits(container, env):
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])
    # ANNSERVE_WORKERS=0 would count the node's CPUs, not the quota
    assert 1 <= int(env["ANNSERVE_WORKERS"]) <= float(resources["limits"]["cpu"])
    assert "ANNSERVE_CACHE_GB" in env  # the default reads the node's memory, not the limit


def test_service_is_headless_and_selects_the_pods(pod, container):
    service = one("Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    for name, port in ports.items():
        assert port["targetPort"] == name
        assert port["port"] == container_port(container, name)


def test_pod_disruption_budget_selects_the_pods(pod, deployment):
    pdb = one("PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    allowed = pdb["spec"].get("maxUnavailable", 0)
    assert isinstance(allowed, int)
    assert 1 <= allowed < deployment["spec"]["replicas"]


def test_readme_tells_trainers_the_headless_service_address():
    text = DEPLOY_README.read_text()
    service = one("Service")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    name = service["metadata"]["name"]
    assert f"dns:///{name}.<namespace>.svc.cluster.local:{port}" in text
    assert "round_robin" in text
    assert "kubectl apply -k deploy/k8s" in text


def local_process(
    container: dict, env: dict[str, str], pod: dict, tmp_path: Path
) -> tuple[list[str], dict[str, str]]:
    """The container's command + args and env made to run here: each volume's mount path
    mapped onto a local directory (the store's onto the real data, the Secret's onto a
    token file, the emptyDir onto tmp_path), loopback, ephemeral ports."""
    command = [*container["command"], *container.get("args", [])]
    assert command[0] == "annserve"
    script = Path(sys.executable).with_name("annserve")
    assert script.exists(), f"{script} missing: reinstall the package (pip install -e .)"
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    (token_dir / "token").write_text("k8s-test-token\n")
    local_tmp = tmp_path / "tmp"
    local_tmp.mkdir()
    mapped = {}
    for path, (_, volume) in mounts(container, pod).items():
        if "persistentVolumeClaim" in volume:
            mapped[path] = str(DATA)
        elif "secret" in volume:
            mapped[path] = str(token_dir)
        elif "emptyDir" in volume:
            mapped[path] = str(local_tmp)

    def local(value: str) -> str:
        for path, here in mapped.items():
            if value == path or value.startswith(path + "/"):
                return here + value[len(path) :]
        return value

    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ANNSERVE_")}
    run_env.update({k: local(v) for k, v in env.items()})
    run_env.update(ANNSERVE_HOST="127.0.0.1", ANNSERVE_PORT="0", ANNSERVE_METRICS_PORT="0")
    run_env["TMPDIR"] = str(local_tmp)  # the pod's /tmp
    return [str(script), *[local(arg) for arg in command[1:]]], run_env


def test_container_command_serves_health_without_token_and_stops_on_sigterm(
    container, env, pod, tmp_path
):
    store = Path(env["ANNSERVE_STORE"])
    if not (
        DATA / store.relative_to(mount_of(str(store), container, pod)[0]["mountPath"])
    ).exists():
        pytest.skip(f"real dataset for {store} not in {DATA}")
    command, run_env = local_process(container, env, pod, tmp_path)
    with spawn(command, run_env) as (proc, lines):
        port, metrics = wait_for_addresses(lines, START_TIMEOUT)
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in (SERVICE, container["readinessProbe"]["grpc"]["service"], ""):
                reply = health.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
            describe = channel.unary_unary(
                "/annserve.v1.AnnServe/DescribeStore",
                request_serializer=pb.DescribeStoreRequest.SerializeToString,
                response_deserializer=pb.StoreInfo.FromString,
            )
            with pytest.raises(grpc.RpcError) as refused:  # the Secret's token is required
                describe(pb.DescribeStoreRequest(), timeout=RPC_TIMEOUT)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = (tmp_path / "token" / "token").read_text().strip()
            info = describe(
                pb.DescribeStoreRequest(),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=RPC_TIMEOUT,
            )
            assert info.n_obs > 0
        path = pod["metadata"]["annotations"]["prometheus.io/path"]
        with urllib.request.urlopen(metrics + path, timeout=RPC_TIMEOUT) as reply:
            assert reply.status == 200
            assert b"annserve_active_streams" in reply.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT) == 0, drain(lines)
