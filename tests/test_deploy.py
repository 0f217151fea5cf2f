"""deploy/: the Dockerfile and the Kubernetes manifests, checked offline: every manifest
against Kubernetes' own schemas, the settings a mesh and a platform team rely on, and
the Dockerfile's install run as written (no container engine runs here)."""

from __future__ import annotations

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
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KUBERNETES = "1.37.0"


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def workloads() -> list[dict[str, Any]]:
    return [d for d in documents() if d["kind"] in ("Deployment", "StatefulSet")]


def test_every_manifest_is_valid_kubernetes() -> None:
    assert len(MANIFESTS) >= 4
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
    secrets = {d["metadata"]["name"] for d in documents() if d["kind"] == "Secret"}
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
        assert used <= secrets  # TLS, tokens and the database password come from Secrets
        assert {"agentlog-tls", "agentlog-auth"} <= used


def test_the_service_names_its_port_for_grpc_and_a_disruption_budget_exists() -> None:
    service = next(d for d in documents() if d["kind"] == "Service")
    grpc_port = next(p for p in service["spec"]["ports"] if p["port"] == 50051)
    assert grpc_port["name"] == "grpc"
    assert grpc_port["appProtocol"] == "grpc"
    budget = next(d for d in documents() if d["kind"] == "PodDisruptionBudget")
    assert budget["spec"]["selector"] == workloads()[0]["spec"]["selector"]


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
