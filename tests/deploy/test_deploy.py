"""
The shipped deployment files, checked by the tools operators and CI would run on them:
hadolint (Containerfile), systemd-analyze verify and security (the unit), a Kubernetes schema
validator (the manifests), podman-compose (the compose file); plus what each must say.
Each tool is also shown a broken file, so a tool that checks nothing can't pass for one that
does.  A missing tool fails the test: .ci/run installs them all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.tools import tool

REPO = Path(__file__).resolve().parents[2]
ETC = REPO / "etc"
K8S = ETC / "kubernetes"
VENDOR_PROBE = (
    "curl --silent http://localhost:8080/v1/status | grep --quiet -e "
    "'^{.*\"state\":\"\\(Connected\\|TrustBased\\)\".*}$'"
)


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


# -- Containerfile ------------------------------------------------------------------------


def test_hadolint_passes_the_containerfile(tmp_path):
    hadolint = tool("hadolint")
    result = run(hadolint, str(REPO / "Containerfile"))
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    assert run(hadolint, str(bad)).returncode != 0


def test_containerfile_says_what_operators_rely_on():
    text = (REPO / "Containerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=\S+slim", text, re.M)
    assert text.count("FROM ${PYTHON_IMAGE}") == 2  # a build stage and the final one
    assert re.search(r"^USER 10001", text, re.M)
    assert 'VOLUME ["/var/lib/license-proxy"]' in text
    assert re.search(r"^EXPOSE 8443 8080$", text, re.M)
    assert "HEALTHCHECK" in text and "/v1/status" in text
    assert re.search(r'^ENTRYPOINT \["license-proxy"\]$', text, re.M)
    assert re.search(r'^CMD \["serve", "/license-proxy.toml"\]$', text, re.M)


# -- systemd ------------------------------------------------------------------------------


def systemd_root(tmp_path: Path, unit_text: str) -> Path:
    """A root with the system's own units, this unit, and the program where the unit runs it."""
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/license-proxy.service").write_text(unit_text)
    bin_dir = root / "opt/license-proxy/bin"
    bin_dir.mkdir(parents=True)
    # The twistd of the tested install, where docs/deploying.md installs it.
    shutil.copy2(Path(sys.executable).parent / "twistd", bin_dir / "twistd")
    return root


def verify(tmp_path, unit_text):
    root = systemd_root(tmp_path, unit_text)
    return run(
        tool("systemd-analyze"), "verify", f"--root={root}",
        "/etc/systemd/system/license-proxy.service",
    )


def test_systemd_analyze_verify_is_clean(tmp_path):
    result = verify(tmp_path, (ETC / "license-proxy.service").read_text())
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    text = (ETC / "license-proxy.service").read_text().replace("bin/twistd", "bin/twisted")
    assert verify(tmp_path, text).returncode != 0


def exposure(path: Path) -> float:
    result = run(tool("systemd-analyze"), "security", "--offline=true", str(path))
    assert result.returncode == 0, result.stderr
    (level,) = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    return float(level)


def test_systemd_analyze_security_rates_it_2_or_lower(tmp_path):
    assert exposure(ETC / "license-proxy.service") <= 2.0
    # Without its hardening, the same tool rates it far worse: the figure is not a constant.
    bare = tmp_path / "license-proxy.service"
    bare.write_text(
        "\n".join(
            line for line in (ETC / "license-proxy.service").read_text().splitlines()
            if line.startswith(("[", "ExecStart=", "Type=", "Description="))
        )
    )
    assert exposure(bare) > 5


def test_systemd_unit_runs_twistd_in_the_foreground_as_a_dynamic_user():
    text = (ETC / "license-proxy.service").read_text()
    directives = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert directives["ExecStart"].startswith(
        "/opt/license-proxy/bin/twistd --nodaemon --pidfile= license-proxy --config "
        "/etc/license-proxy/license-proxy.toml"
    )
    assert directives["DynamicUser"] == "yes"
    assert directives["StateDirectory"] == "license-proxy"  # /var/lib/license-proxy
    assert directives["ConfigurationDirectory"] == "license-proxy"  # /etc/license-proxy
    assert directives["CapabilityBoundingSet"] == ""
    assert directives["ProtectSystem"] == "strict"
    assert directives["RestartPreventExitStatus"] == "2"


# -- Kubernetes ---------------------------------------------------------------------------

MANIFESTS = ["deployment.yaml", "services.yaml", "pdb.yaml", "peers.yaml"]


def resources() -> dict[str, dict]:
    found = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def test_kubernetes_manifests_validate_against_the_schema(tmp_path):
    validate = tool("kubernetes-validate")
    result = run(validate, "--strict", *[str(K8S / n) for n in MANIFESTS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 5, result.stdout
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    # The ConfigMap kustomize generates from license-proxy.toml, as kubectl apply -k makes it.
    (generator,) = kustomization["configMapGenerator"]
    configmap = tmp_path / "configmap.yaml"
    configmap.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
        "data": {name: (K8S / name).read_text() for name in generator["files"]},
    }))
    result = run(validate, "--strict", str(configmap))
    assert result.returncode == 0 and "passed" in result.stdout, result.stdout + result.stderr
    # A misspelt field must fail.
    bad = tmp_path / "deployment.yaml"
    bad.write_text((K8S / "deployment.yaml").read_text().replace("readinessProbe:", "readinesProbe:"))
    assert run(validate, "--strict", str(bad)).returncode != 0


def test_deployment_upgrades_blue_green_and_runs_locked_down():
    found = resources()
    deployment = found["Deployment/deepgram-license-proxy"]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert spec["selector"]["matchLabels"] == {"app": "deepgram-license-proxy"}
    assert spec["template"]["metadata"]["labels"] == {"app": "deepgram-license-proxy"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    # The vendor chart's command line, probe and timings.
    assert container["command"] == ["hermes"]
    assert container["args"] == ["-v", "serve", "/etc/config/license-proxy.toml"]
    readiness = container["readinessProbe"]
    assert readiness.pop("exec")["command"] == ["sh", "-c", VENDOR_PROBE]
    assert readiness == {"initialDelaySeconds": 5, "periodSeconds": 10, "failureThreshold": 1}
    assert container["livenessProbe"] == {
        "tcpSocket": {"port": 8080}, "initialDelaySeconds": 5, "periodSeconds": 10,
        "failureThreshold": 3,
    }
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "primary": 8443, "status": 8080,
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["memory"] == "128Mi"
    assert container["resources"]["limits"]["memory"] == "256Mi"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/var/lib/license-proxy"] == "state"  # the directory, not the file
    assert mounts["/etc/config"] == "config"
    (config_volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    # The generated ConfigMap, whose name kustomize suffixes with a hash of the config: a
    # changed config changes the pod template, and the pods roll.
    assert config_volume["configMap"]["name"] == generator["name"]
    assert generator["files"] == ["license-proxy.toml"]
    assert not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash")
    assert not generator.get("options", {}).get("disableNameSuffixHash")
    # The key is DEEPGRAM_API_KEY from the Secret, as in the vendor's chart; none in the file.
    assert "\nkey" not in (K8S / "license-proxy.toml").read_text()
    (key,) = [e for e in container["env"] if e["name"] == "DEEPGRAM_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["name"] == "deepgram-license-proxy"
    services = {
        name: [(p["name"], p["port"]) for p in svc["spec"]["ports"]]
        for name, svc in found.items() if name.startswith("Service/")
    }
    assert services == {
        "Service/deepgram-license-proxy-internal": [("primary", 8443)],
        "Service/deepgram-license-proxy-status": [("status", 8080)],
        "Service/deepgram-license-proxy-peers": [("primary", 8443)],
    }
    # The peers: a headless Service listing every pod, ready or not, and the settings from the
    # environment only (as the vendor chart's extraEnv gives them), the PEM from the Secret
    # that peers-certificate.yaml has cert-manager make.
    peers = found["Service/deepgram-license-proxy-peers"]["spec"]
    assert (peers["clusterIP"], peers["publishNotReadyAddresses"]) == ("None", True)
    assert peers["selector"] == {"app": "deepgram-license-proxy"}
    env = {e["name"]: e for e in container["env"]}
    assert env["LICENSE_PROXY_PEERS_NAME"]["value"] == "deepgram-license-proxy-peers"
    for variable, key in (("CA", "ca.crt"), ("CERT", "tls.crt"), ("KEY", "tls.key")):
        assert env[f"LICENSE_PROXY_PEERS_{variable}"]["valueFrom"]["secretKeyRef"] == {
            "name": "deepgram-license-proxy-peers", "key": key,
        }
    issued = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all((K8S / "peers-certificate.yaml").read_text())
    }
    certificate = issued["deepgram-license-proxy-peers"]["spec"]
    assert certificate["secretName"] == "deepgram-license-proxy-peers"
    assert certificate["dnsNames"] == ["deepgram-license-proxy-peers"]
    assert sorted(certificate["usages"]) == ["client auth", "server auth"]
    assert certificate["issuerRef"]["name"] == "deepgram-license-proxy-peers"
    assert issued["deepgram-license-proxy-peers-ca"]["spec"]["isCA"] is True
    for name, svc in found.items():
        assert svc["metadata"]["labels"] == {"app": "deepgram-license-proxy"}, name
    assert found["PodDisruptionBudget/deepgram-license-proxy"]["spec"]["minAvailable"] == 1


# -- compose ------------------------------------------------------------------------------


def test_podman_compose_config_accepts_the_compose_file(tmp_path):
    compose = tool("podman-compose")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: podman-compose needs it even for `config`")
    env = dict(os.environ, DEEPGRAM_API_KEY="not-a-real-key")
    result = run(compose, "-f", str(ETC / "compose.yaml"), "config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The service name the vendor's API and Engine configs use, and its compose arguments.
    service = yaml.safe_load(result.stdout)["services"]["license-proxy"]
    assert service["command"] == ["-v", "serve", "/license-proxy.toml"]
    assert service["ports"] == ["8089:8080"]
    assert "./license-proxy.toml:/license-proxy.toml:ro" in service["volumes"]
    assert "license-proxy-state:/var/lib/license-proxy" in service["volumes"]
    assert service["restart"] == "always"
    # Without the key, compose refuses to start it rather than run an unlicensed proxy.
    env.pop("DEEPGRAM_API_KEY")
    refused = run(compose, "-f", str(ETC / "compose.yaml"), "config", env=env, cwd=tmp_path)
    assert refused.returncode != 0 and "set DEEPGRAM_API_KEY" in refused.stderr
