"""
The load test at full length: ``bench/load`` drives 200 concurrent clients through a real proxy
for 60 s; every request answered and relayed, no error of any kind, the peak RSS under the
Kubernetes memory limit.  Its figures are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.support.installed import REPO_ROOT


def test_200_clients_for_60_seconds_without_an_error(tmp_path):
    # A missing tool fails loudly: bash .ci/run installs both.
    assert shutil.which("wrk"), "needs wrk: apt-get install -y --no-install-recommends wrk"
    out = tmp_path / "load.json"
    run = subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "load"), "--out", str(out)],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True, text=True, timeout=180,
    )
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["settings"] == {"seconds": 60, "connections": 200, "max_rss_mib": 256}
    assert sum(g["connections"] for g in result["groups"]) == 200
    assert result["error_total"] == 0, result["errors"]
    assert result["requests"] > 0 and result["upstream_requests"] >= result["requests"]
    assert result["rss_peak_mib"] <= 256
    assert result["passed"]
