"""
The Grafana dashboard (etc/grafana/license-proxy.json), without a Grafana: every panel's
query (and every variable's) is valid PromQL to ``promtool`` once Grafana's variables are
replaced, and every metric name it uses is one a real running proxy serves on ``/metrics``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.configs import config
from tests.support.proxy import ProxyProcess, free_port

DASHBOARD = Path(__file__).resolve().parents[2] / "etc" / "grafana" / "license-proxy.json"

#: What Grafana puts in place of its variables before sending a query.
VARIABLES = {"$__rate_interval": "2m", "$job": ".*", "$instance": ".*"}


def queries() -> dict[str, str]:
    """Every panel's query by ``panel <id> <refId>``, variables replaced."""
    board = json.loads(DASHBOARD.read_text())
    found = {}
    for panel in board["panels"]:
        for target in panel["targets"]:
            found[f"panel {panel['id']} {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        # label_values(<selector>, label) is Grafana's; the selector is PromQL.
        (selector,) = re.fullmatch(r"label_values\((.*), \w+\)", variable["definition"]).groups()
        found[f"variable {variable['name']}"] = selector
    for name, expr in found.items():
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{name}: a variable the test does not know: {expr}"
        found[name] = expr
    return found


def test_the_dashboard_is_importable():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "license-proxy" and board["title"] == "license-proxy"
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["description"], panel["title"]


def test_every_query_passes_promtool(tmp_path):
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    found = queries()
    rules = [
        {"record": "grafana:" + re.sub(r"\W", "_", name), "expr": expr}
        for name, expr in found.items()
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout


def test_every_metric_it_uses_is_served_by_a_running_proxy(tmp_path, pki, upstream):
    used = set()
    for expr in queries().values():
        used |= set(re.findall(r"\b((?:license_proxy|process)_[a-z_]+)\b", expr))
    assert {"process_resident_memory_bytes", "license_proxy_state", "license_proxy_peer_up"} <= used
    # With a peer configured (none listening: it shows as down), so its metrics are served too.
    tls = f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"'
    peers = (
        f'\n[peers]\nurls = ["https://127.0.0.1:{free_port()}/"]\nca_file = "{pki.ca_cert}"\n'
        f'cert_file = "{pki.peer_cert}"\nkey_file = "{pki.peer_key}"\n'
    )
    text = config(tmp_path, pki, upstream.url, server=tls) + peers
    with ProxyProcess(tmp_path, text, ca_file=pki.ca_cert) as proxy:
        proxy.wait_state("Connected")
        assert proxy.request("GET", "/v1/check")[0] == 200
        text = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"http://127.0.0.1:{proxy.status_port}/metrics", timeout=10
        ).read().decode()
    served = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    assert used - served == set(), f"not on /metrics: {sorted(used - served)}"
