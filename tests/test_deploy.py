"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline: every manifest
against Kubernetes' own schemas, the settings a mesh and a platform team rely on, and
the Dockerfile's install run as written (no container engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent for p in (DEPLOY / "kubernetes").glob("*/kustomization.yaml"))
KUBERNETES = "1.37.0"


def kustomization(overlay: Path) -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    return found


def rendered(overlay: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k` applies of an overlay (its resources, with its image tag)."""
    tags = {i["name"]: i["newTag"] for i in kustomization(overlay).get("images", [])}
    found = []
    for name in kustomization(overlay)["resources"]:
        for doc in yaml.safe_load_all((overlay / name).read_text()):
            if not doc:
                continue
            for container in _pod(doc).get("containers", []):
                image = container["image"].split(":")[0]
                if image in tags:
                    container["image"] = f"{image}:{tags[image]}"
            found.append(doc)
    return found


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = doc.get("spec", {}).get("template", {}).get("spec", {})
    return pod


def documents() -> list[dict[str, Any]]:
    return [doc for overlay in OVERLAYS for doc in rendered(overlay)]


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in ("Deployment", "StatefulSet")]


def test_every_manifest_is_valid_kubernetes() -> None:
    assert [o.name for o in OVERLAYS] == ["jsonl", "postgres"]
    for document in documents():
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_a_statefulset_for_jsonl_and_a_deployment_for_postgresql() -> None:
    kinds = {d["kind"]: d for d in workloads()}
    stateful = kinds["StatefulSet"]
    assert stateful["spec"]["replicas"] == 1  # the JSONL store is one process
    assert stateful["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    deployment = kinds["Deployment"]
    assert deployment["spec"]["replicas"] > 1
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AGENTLOG_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "agentlog-postgres"
    assert "PGPASSWORD" in env


def _arg(args: list[str], flag: str) -> str | None:
    for index, arg in enumerate(args):
        if arg == flag:
            return args[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def test_workloads_are_ready_for_a_platform_team() -> None:
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        container = pod["containers"][0]
        grace = float(_arg(container.get("args", []), "--grace") or 10)
        assert pod["terminationGracePeriodSeconds"] > grace
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        probe = container["readinessProbe"]["exec"]["command"]
        assert probe[:2] == ["agentlog", "health"]  # the gRPC health check
        assert "livenessProbe" in container
        assert {p["name"] for p in container["ports"]} >= {"grpc", "metrics"}
        used = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        used |= {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
        }
        # TLS, tokens and the database password come from Secrets (the README makes them).
        assert {"agentlog-tls", "agentlog-auth"} <= used


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_each_apply_deploys_one_workload_and_selects_only_its_pods() -> None:
    pods = {
        overlay.name: [
            d["spec"]["template"]["metadata"]["labels"]
            for d in rendered(overlay)
            if d["kind"] in ("Deployment", "StatefulSet")
        ]
        for overlay in OVERLAYS
    }
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        [workload] = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selects(workload["spec"]["selector"]["matchLabels"], labels)
        for doc in docs:
            selector = doc["spec"].get("selector") if doc["kind"] != "StatefulSet" else None
            if doc["kind"] == "Service":
                selector = doc["spec"]["selector"]
            elif doc["kind"] == "PodDisruptionBudget":
                selector = doc["spec"]["selector"]["matchLabels"]
            else:
                continue
            assert _selects(selector, labels), doc["metadata"]["name"]
            for other, others in pods.items():  # nor the pods another apply makes
                if other != overlay.name:
                    assert not any(_selects(selector, o) for o in others), (overlay, doc)
        if workload["kind"] == "StatefulSet":
            [governing] = [
                d
                for d in docs
                if d["kind"] == "Service"
                and d["metadata"]["name"] == workload["spec"]["serviceName"]
            ]
            assert governing["spec"]["clusterIP"] == "None"  # headless, as a StatefulSet needs
        grpc_service = next(
            d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "agentlog"
        )
        grpc_port = next(p for p in grpc_service["spec"]["ports"] if p["port"] == 50051)
        assert grpc_port["name"] == "grpc"
        assert grpc_port["appProtocol"] == "grpc"
    budget = next(d for d in documents() if d["kind"] == "PodDisruptionBudget")
    assert budget["metadata"]["name"] == "agentlog-postgres"


def test_the_image_the_readme_builds_is_the_one_the_manifests_run() -> None:
    readme = (ROOT / "README.md").read_text()
    built = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", readme)
    assert built is not None
    assert built.group(1) in (DEPLOY / "Dockerfile").read_text()
    for document in documents():
        for container in _pod(document).get("containers", []):
            assert container["image"] == built.group(1)


def test_the_readme_makes_every_secret_the_manifests_read() -> None:
    readme = (ROOT / "README.md").read_text()
    made: dict[str, set[str]] = {}
    for line in re.findall(r"^kubectl create secret .*$", readme, re.M):
        name = line.split()[4]
        keys = set(re.findall(r"--from-(?:file|literal)=([\w.]+)=", line))
        made.setdefault(name, set()).update(keys)
    for document in documents():
        pod = _pod(document)
        if not pod:
            continue
        container = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        for volume in pod["volumes"]:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in made, name
                path = mounts[volume["name"]]
                for env in container["env"]:
                    value = env.get("value", "")
                    if value.startswith(path + "/"):
                        assert value.removeprefix(path + "/") in made[name], value
        for env in container["env"]:
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in made[ref["name"]], ref


def test_the_images_dependencies_are_pinned_to_what_the_tests_ran_with() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_pins", ROOT / "tools/runtime_pins.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = dict(
        line.split("==")
        for line in (DEPLOY / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert pins == module.closure("agentlog")
    ignored = (ROOT / ".dockerignore").read_text()
    assert ignored.splitlines()[2] == "*"  # the context holds only what the image needs
    for needed in ("!pyproject.toml", "!README.md", "!deploy/requirements.txt", "!src/"):
        assert needed in ignored.splitlines()


def _expanded(env: list[dict[str, Any]], given: dict[str, str]) -> dict[str, str]:
    """A container's plain env values, with $(VAR) expanded as the kubelet does."""
    found = dict(given)
    for item in env:
        if "value" in item:
            found[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: found[m.group(1)], item["value"])
    return found


def test_the_readiness_probe_passes_as_written_with_a_certificate_for_the_service(
    tmp_path: Path,
) -> None:
    from agentlog.server import MemorySessionRepository
    from agentlog.server._tls import TlsFiles
    from tests.certs import CertificateAuthority
    from tests.servers import running_server

    ca = CertificateAuthority(tmp_path / "ca", "cluster-ca")
    # As cert-manager issues it: the Service's names only, for both usages.
    issued = ca.issue(
        "agentlog",
        dns=("agentlog", "agentlog.default", "agentlog.default.svc"),
        both=True,
    )
    mounted = tmp_path / "tls"
    mounted.mkdir()
    (mounted / "tls.crt").write_bytes(issued.cert.read_bytes())
    (mounted / "tls.key").write_bytes(issued.key.read_bytes())
    (mounted / "ca.crt").write_bytes(ca.pem.read_bytes())
    files = TlsFiles(mounted / "tls.crt", mounted / "tls.key", mounted / "ca.crt")
    with running_server(MemorySessionRepository(), tls=files) as target:
        port = target.rsplit(":", 1)[1]
        for workload in workloads():
            container = _pod(workload)["containers"][0]
            environment = _expanded(container["env"], {"POD_NAMESPACE": "default"})
            command = [
                arg.replace("/etc/agentlog/tls", str(mounted)).replace(":50051", f":{port}")
                for arg in container["readinessProbe"]["exec"]["command"]
            ]
            agentlog = str(Path(sys.executable).with_name("agentlog"))
            env = {"PATH": os.environ["PATH"], **environment}
            probe = subprocess.run(
                [agentlog, *command[1:]], env=env, capture_output=True, text=True, check=False
            )
            assert probe.returncode == 0, probe.stderr
            assert "SERVING" in probe.stdout
            # Without the Service's name, the same probe fails: the check is real.
            del env["AGENTLOG_TLS_SERVER_NAME"]
            failed = subprocess.run(
                [agentlog, *command[1:]], env=env, capture_output=True, text=True, check=False
            )
            assert failed.returncode != 0


def test_the_dockerfile_runs_as_a_user_with_a_volume_and_a_health_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert 'VOLUME ["/data"]' in text
    assert re.search(r'HEALTHCHECK .*\n?.*CMD \["agentlog", "health"', text)
    assert "python:3.11-slim" in text


@pytest.mark.timeout(600)
def test_the_dockerfile_install_works_as_written(tmp_path: Path) -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    install = re.search(r"^RUN (python -m venv /opt/agentlog && .*)$", text, re.M)
    assert install is not None
    source = tmp_path / "src-tree"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copy(DEPLOY / "requirements.txt", source / "requirements.txt")
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    command = install.group(1).replace("/opt/agentlog", str(tmp_path / "venv"))
    command = command.replace(" /src", f" {source}").replace(
        "python -m venv", f"{sys.executable} -m venv"
    )
    subprocess.run(command, shell=True, check=True, capture_output=True, timeout=540)
    health = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "agentlog"), "health", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "SERVING" in health.stdout
