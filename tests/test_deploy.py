"""``deploy/``: the container image, the Kubernetes manifests and the systemd unit.

No container engine runs here, so the Containerfile is linted (hadolint), not built; the
manifests are validated offline against the Kubernetes schemas ``kubernetes-validate`` ships,
strictly (an unknown field fails); the unit goes through ``systemd-analyze verify``. Beyond the
schemas, the tests hold the manifests to what the proxy needs: probes on its probe paths, a
grace period longer than its ``shutdown_grace``, settings that load.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from shanoir_dicomweb_proxy import ServerSettings, Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
BIN = Path(sys.executable).parent


def _run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=120, check=False
    )


def _resources() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def _settings(tmp_path: Path) -> Settings:
    """The ConfigMap's TOML, loaded as the proxy loads it (secret files put in ``tmp_path``)."""
    text = _resources()["ConfigMap"]["data"]["proxy.toml"]
    secret = tmp_path / "secret"
    secret.write_text("value\n")
    text = text.replace("/etc/shanoir-dicomweb-proxy/secrets/shanoir-client-secret", str(secret))
    return Settings.from_dict(tomllib.loads(text), source="configmap.yaml", base_dir=tmp_path)


def test_the_containerfile_passes_hadolint() -> None:
    result = _run(BIN / "hadolint", DEPLOY / "Containerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_containerfile_runs_one_serve_process_as_a_user() -> None:
    lines = [line.strip() for line in (DEPLOY / "Containerfile").read_text().splitlines()]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM ")][0]].startswith(
        "FROM docker.io/library/python:3.12-slim"
    )
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    assert 'ENTRYPOINT ["shanoir-dicomweb-proxy"]' in lines
    assert any(line.startswith('CMD ["serve", ') for line in lines)


def test_the_manifests_are_valid_kubernetes() -> None:
    assert {path.name for path in MANIFESTS} >= {
        "configmap.yaml",
        "deployment.yaml",
        "poddisruptionbudget.yaml",
        "secret.yaml",
        "service.yaml",
    }
    result = _run(BIN / "kubernetes-validate", "--strict", *MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(MANIFESTS)


def test_the_validator_does_fail(tmp_path: Path) -> None:
    """A misspelled field is refused: the validation above is not vacuous."""
    broken = (
        (DEPLOY / "kubernetes" / "deployment.yaml").read_text().replace("replicas: 2", "replica: 2")
    )
    (tmp_path / "deployment.yaml").write_text(broken)
    result = _run(BIN / "kubernetes-validate", "--strict", tmp_path / "deployment.yaml")
    assert result.returncode != 0
    assert "replica" in result.stdout + result.stderr


def test_the_deployment_fits_the_proxy(tmp_path: Path) -> None:
    resources = _resources()
    settings = _settings(tmp_path)
    deployment = resources["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    pod = deployment["template"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == settings.server.healthz_path
    assert container["readinessProbe"]["httpGet"]["path"] == settings.server.readyz_path
    assert container["readinessProbe"]["timeoutSeconds"] > settings.server.ready_timeout
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > settings.server.shutdown_grace + pause
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The secrets are files of the Secret, the settings the ConfigMap's.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == resources["Secret"]["metadata"]["name"]
    secret_file = settings.shanoir.service.client_secret_file
    assert secret_file.startswith(str(tmp_path))  # the settings read it from the mount below
    assert mounts["secrets"] == "/etc/shanoir-dicomweb-proxy/secrets"
    assert set(resources["Secret"]["stringData"]) == {"shanoir-client-secret"}
    assert volumes["config"]["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
    # Replicas behind one Service need the platform backends, not one node's store.
    assert (settings.mapping.backend, settings.access.backend) == ("shanoir", "shanoir")
    port = int(settings.server.bind.rsplit(":", 1)[1])
    assert container["ports"][0]["containerPort"] == port
    service = resources["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    budget = resources["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] < deployment["replicas"]


def test_the_systemd_unit(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "shanoir-dicomweb-proxy.service").read_text()
    keys = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#")
    assert keys["DynamicUser"] == "yes"
    assert keys["StateDirectory"] == "shanoir-dicomweb-proxy"
    assert keys["LoadCredential"].startswith("shanoir-client-secret:")
    assert keys["ExecStart"].endswith("serve -c /etc/shanoir-dicomweb-proxy/proxy.toml")
    assert int(keys["TimeoutStopSec"]) > ServerSettings().shutdown_grace
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:  # where systemd is installed, its own check too
        local = tmp_path / "shanoir-dicomweb-proxy.service"
        local.write_text(
            unit.replace(
                "/opt/shanoir-dicomweb-proxy/bin/shanoir-dicomweb-proxy",
                str(BIN / "shanoir-dicomweb-proxy"),
            )
        )
        result = _run(analyze, "verify", local)
        assert result.returncode == 0, result.stdout + result.stderr
