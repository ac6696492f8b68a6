"""
The image run as the vendor's own deployment files run theirs, with a real ``podman run`` (as
root) and a real ``podman-compose up``: the image with no arguments, with the vendor compose
file's arguments (``-v serve /license-proxy.toml``), and as the vendor's Helm chart runs it
(``hermes -v serve /etc/config/license-proxy.toml``, the config in a directory as a ConfigMap
is, no state volume).  Each has DEEPGRAM_API_KEY in its environment and no key in its config,
publishes its status port with ``-p``, passes the chart's readiness probe run inside it with
``podman exec``, relays a request, and stops cleanly on ``podman stop``.

podman's defaults fail on these machines (crun can't set rlimits under cgroups v1 hybrid), so
the tests give podman a containers.conf of their own through CONTAINERS_CONF: runtime runc, and
explicit ulimits.  The license server is a real TLS server of the tests on the host's loopback,
reached from the container through slirp4netns's gateway to it (10.0.2.2), by a name its
certificate holds: nothing listens beyond loopback.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from license_proxy.tls.certs import issue
from tests.support.image import IMAGE, REPO, VENDOR_PROBE, run, wait_for
from tests.support.proxy import free_port
from tests.support.tools import tool
from tests.support.upstream import Upstream

KEY = "vendor-files-test-key-7c41"
UPSTREAM_NAME = "license.test"
# slirp4netns's address of the host's loopback, when allow_host_loopback is set.
HOST_LOOPBACK = "10.0.2.2"
NETWORK = "slirp4netns:allow_host_loopback=true"
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    """The environment podman runs in: a containers.conf that works on these machines."""
    missing = [t for t in ("podman", "runc", "slirp4netns") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)} (.ci/run installs them)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={hard}:{hard}", "nproc=1024:1024"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


@pytest.fixture(scope="module")
def license_server(pki, tmp_path_factory):
    """A TLS license server on 127.0.0.1 with a certificate for UPSTREAM_NAME."""
    directory = tmp_path_factory.mktemp("license-server")
    pair = issue(pki.pairs["ca"], [UPSTREAM_NAME], now=datetime.now(timezone.utc))
    pair.write(str(directory / "server.crt"), str(directory / "server.key"))
    with Upstream(str(directory / "server.crt"), str(directory / "server.key")) as up:
        yield up


def proxy_config(directory: Path, pki, license_server) -> Path:
    """The vendor's [server] keys, our upstream and its CA; no key: DEEPGRAM_API_KEY is."""
    (directory / "ca.crt").write_bytes(pki.pairs["ca"].cert_pem)
    config = directory / "license-proxy.toml"
    config.write_text(
        '[server]\nhost = "0.0.0.0"\nport = 8443\nbase_url = "/"\nstatus_port = 8080\n\n'
        f'[license]\nserver_url = "https://{UPSTREAM_NAME}:{license_server.port}"\n'
        'ca_file = "/ca/ca.crt"\n'
    )
    for path in (directory / "ca.crt", config):
        path.chmod(0o644)
    return config


def podman(env, *args, check=True, timeout=120):
    return run("podman", *args, check=check, timeout=timeout, env=env)


def status(port: int) -> dict | None:
    try:
        with _direct.open(f"http://127.0.0.1:{port}/v1/status", timeout=2) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


INVOCATIONS = {
    # The image as it is: no arguments.
    "no-arguments": ([], [("license-proxy.toml", "/license-proxy.toml")], []),
    # The vendor's compose files: command: -v serve /license-proxy.toml
    "vendor-compose": (
        ["-v", "serve", "/license-proxy.toml"], [("license-proxy.toml", "/license-proxy.toml")], [],
    ),
    # The vendor's chart: command ["hermes"], the ConfigMap's directory at /etc/config, no
    # state volume (the image's VOLUME ignored, as Kubernetes ignores it).
    "vendor-chart": (
        ["-v", "serve", "/etc/config/license-proxy.toml"], [("config", "/etc/config")],
        ["--entrypoint", "hermes", "--image-volume", "ignore",
         "-e", "DEEPGRAM_DEPLOYMENT_ORCHESTRATOR=helm-test"],
    ),
}


@pytest.mark.parametrize("invocation", list(INVOCATIONS))
def test_the_vendors_invocations_run_a_working_proxy(
    invocation, image, podman_env, pki, license_server, tmp_path
):
    arguments, mounts, options = INVOCATIONS[invocation]
    (tmp_path / "config").mkdir()
    config = proxy_config(tmp_path / "config", pki, license_server)
    shutil.copy(config, tmp_path / "license-proxy.toml")
    (tmp_path / "license-proxy.toml").chmod(0o644)
    (tmp_path / "config").chmod(0o755)
    name = f"lp-vendor-{invocation}-{os.getpid()}"
    port = free_port()
    volumes = [f"--volume={tmp_path / host}:{inside}:ro" for host, inside in mounts]
    before = len(license_server.requests)
    try:
        podman(
            podman_env, "run", "--detach", "--name", name, "--no-healthcheck",
            "--network", NETWORK, "--add-host", f"{UPSTREAM_NAME}:{HOST_LOOPBACK}",
            "--publish", f"127.0.0.1:{port}:8080", "--env", f"DEEPGRAM_API_KEY={KEY}",
            f"--volume={tmp_path / 'config' / 'ca.crt'}:/ca/ca.crt:ro", *volumes, *options,
            IMAGE, *arguments,
        )
        try:
            # Through the published port, from the host.
            wait_for("Connected on the published status port",
                     lambda: (status(port) or {}).get("state") == "Connected", 60)
        except AssertionError:
            logs = podman(podman_env, "logs", name, check=False)
            raise AssertionError(logs.stdout + logs.stderr) from None
        # The chart's readiness probe, character for character, inside the container.
        probe = podman(podman_env, "exec", name, "sh", "-c", VENDOR_PROBE, check=False)
        assert probe.returncode == 0, probe
        # A licensing request relayed by it, with the client's own credentials.
        relayed = podman(
            podman_env, "exec", name, "curl", "--silent", "--show-error", "--insecure",
            "-H", "Authorization: Token client", "https://localhost:8443/v1/licenses/1",
        )
        assert relayed.stdout.startswith("{"), relayed
        seen = license_server.requests[before:]
        assert seen[0].header("Authorization") == f"Token {KEY}"  # its own check-in
        assert [r.path for r in seen if r.header("Authorization") == "Token client"] == [
            "/v1/licenses/1"
        ]
        # The trust cache, inside the container when no volume is mounted.
        wait_for("the trust cache", lambda: podman(
            podman_env, "exec", name, "test", "-s", "/var/lib/license-proxy/trust-cache.json",
            check=False,
        ).returncode == 0, 30)
        podman(podman_env, "stop", "--time", "30", name)
        state = json.loads(podman(podman_env, "inspect", name).stdout)[0]["State"]
        logs = podman(podman_env, "logs", name)
        log = logs.stdout + logs.stderr
        # A clean stop: twistd re-raises SIGTERM after it (128 + 15), which the kernel ignores
        # in a container's PID 1 without a handler, so the status there is 0.
        assert state["ExitCode"] in (0, 143), (state, log)
        assert "Server Shut Down." in log and "Traceback" not in log, log
        assert KEY not in log
        # -v raises the log level: the debug line of the configuration.
        assert ("configuration from" in log) == ("-v" in arguments), log
    finally:
        podman(podman_env, "rm", "--force", "--volumes", name, check=False)


def test_podman_compose_up_runs_the_shipped_compose_file(
    image, podman_env, pki, license_server, tmp_path
):
    compose = tool("podman-compose")
    config = proxy_config(tmp_path, pki, license_server)
    port = free_port()
    # What the compose file leaves to this machine: reaching the test's license server on the
    # host's loopback, and the CA that verifies it.
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"services": {"license-proxy": {
        "network_mode": NETWORK,
        "extra_hosts": [f"{UPSTREAM_NAME}:{HOST_LOOPBACK}"],
        "volumes": [f"{tmp_path / 'ca.crt'}:/ca/ca.crt:ro"],
    }}}))
    project = f"lp-compose-{os.getpid()}"
    env = {
        **podman_env, "DEEPGRAM_API_KEY": KEY, "LICENSE_PROXY_IMAGE": IMAGE,
        "LICENSE_PROXY_CONFIG": str(config), "LICENSE_PROXY_STATUS_PORT": f"127.0.0.1:{port}",
    }
    files = ["-p", project, "-f", str(REPO / "etc" / "compose.yaml"), "-f", str(override)]
    try:
        up = run(compose, *files, "up", "-d", env=env, cwd=tmp_path, timeout=300)
        try:
            wait_for("Connected on the published status port",
                     lambda: (status(port) or {}).get("state") == "Connected", 60)
        except AssertionError:
            logs = run(compose, *files, "logs", env=env, cwd=tmp_path, check=False)
            raise AssertionError(up.stdout + up.stderr + logs.stdout + logs.stderr) from None
        assert license_server.requests[-1].header("Authorization") == f"Token {KEY}"
        (container,) = json.loads(podman(
            podman_env, "ps", "--format", "json", "--filter", f"label=io.podman.compose.project={project}",
        ).stdout)
        probe = podman(podman_env, "exec", container["Id"], "sh", "-c", VENDOR_PROBE, check=False)
        assert probe.returncode == 0, probe
    finally:
        run(compose, *files, "down", "-v", env=env, cwd=tmp_path, check=False, timeout=300)


def test_the_image_checks_its_own_default_config(image, podman_env):
    """No config mounted: the image's /license-proxy.toml (the built-in defaults) and the key."""
    checked = podman(
        podman_env, "run", "--rm", "--no-healthcheck", "--network", "none",
        "--env", f"DEEPGRAM_API_KEY={KEY}", IMAGE, "check", "/license-proxy.toml",
    )
    assert checked.stdout.splitlines() == [
        "license-proxy: /license-proxy.toml: OK: licensing on https://0.0.0.0:8443/, status on"
        " port 8080, upstream https://license.deepgram.com"
    ]
    refused = podman(
        podman_env, "run", "--rm", "--no-healthcheck", "--network", "none", IMAGE, "check",
        check=False,
    )
    assert refused.returncode == 2
    assert "set [license] key in the config file or the DEEPGRAM_API_KEY" in refused.stderr
