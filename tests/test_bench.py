"""
The benchmark harness in a tiny mode (one round, one second a workload): it runs end to end,
proves that its nginx relay gives license-proxy's guarantee, and counts no errors.  Its figures
mean nothing at this length; the benchmark itself is ``bash bench/run``, never part of CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def test_a_tiny_benchmark_proves_the_nginx_config_and_has_no_errors(tmp_path):
    # A missing tool fails loudly: bash .ci/run installs both.
    assert shutil.which("wrk"), "needs wrk: apt-get install -y --no-install-recommends wrk"
    assert shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"), "needs nginx: apt-get install nginx"
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "--rounds", "1", "--seconds", "1",
         "--paced-seconds", "1", "--distinct", "200", "--out", str(out)],
        capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["proof"]["passed"]
    assert result["errors"] == 0
    assert {row["workload"] for row in result["summary"]} == {"1a", "1b", "2", "3", "4", "5"}
    assert "| 1a relay, keep-alive, GET | ours |" in result["table"]
    assert result["memory"]["ours"]["trust_cache_entries"] >= 200
