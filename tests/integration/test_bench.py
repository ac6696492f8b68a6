"""
The benchmark scripts in a tiny mode, so none rots: the harness (one round, one second a
workload) runs end to end, proves that its nginx relay gives license-proxy's guarantee, and
counts no errors; bench/faults.py and bench/hostile.py run and see what they measure.  Their
figures mean nothing at this length; the benchmark itself is ``bash bench/run``, never in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

def test_a_tiny_benchmark_proves_the_nginx_config_and_has_no_errors(tmp_path):
    # A missing tool fails loudly: bash .ci/run installs both.
    assert shutil.which("wrk"), "needs wrk: apt-get install -y --no-install-recommends wrk"
    assert shutil.which("nginx") or os.path.exists("/usr/sbin/nginx"), "needs nginx: apt-get install nginx"
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "--rounds", "1", "--seconds", "1",
         "--paced-seconds", "1", "--distinct", "200", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["proof"]["passed"]
    assert result["errors"] == 0
    assert {row["workload"] for row in result["summary"]} == {"1a", "1b", "2", "3r", "3h", "3b", "4", "5"}
    # Every fault was answered from trust by ours, and ours came back after each.
    for fault in ("3r", "3h", "3b"):
        (ours,) = [r for r in result["summary"] if (r["workload"], r["contender"]) == (fault, "ours")]
        assert ours["requests"] > 0, ours
    assert len(result["recoveries"]) == 3
    assert "| 1a relay, keep-alive, GET | ours |" in result["table"]
    assert result["memory"]["ours"]["trust_cache_entries"] >= 200


def _script(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / args[0]), *args[1:]],
        capture_output=True, text=True, timeout=150,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout


def test_the_broken_upstream_timings_run_and_every_fault_is_answered_from_trust():
    from tests.support.faults import FAULTS

    rows = {line[:40].strip(): line for line in _script("faults.py", "--rounds", "1").splitlines()}
    for fault in FAULTS:
        assert rows[fault].endswith("200 with Age"), rows.get(fault)
    assert rows["healthy, stale pooled connection"].split()[-3:] == ["2.0", "1.0", "200"]


def test_the_hostile_client_figures_run_and_each_attack_is_met():
    out = _script("hostile.py", "--seconds", "1", "--slowloris", "20")
    phases = [line.split()[0] for line in out.splitlines() if "answers/s" in line]
    assert phases == ["alone", "slowloris", "bodies", "connections"], out
    refused = {" ".join(line.split()[1:]): int(line.split()[0])
               for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert refused["HTTP/1.1 413"] > 0 and refused["over the peer limit: closed at once"] > 0, out


def test_the_trust_cache_write_costs_run_and_a_checkin_writes_one_line():
    out = _script("cachewrite.py", "--entries", "10", "1000", "--checkins", "3")
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| 1")]
    assert [row[:2] for row in rows] == [
        ["10", "checkin"], ["10", "compaction"], ["1,000", "checkin"], ["1,000", "compaction"]
    ], out
    checkin_bytes = [int(row[4].replace(",", "")) for row in rows if row[1] == "checkin"]
    assert checkin_bytes[0] == checkin_bytes[1] < 100, out  # whatever the number of answers
    assert int(rows[3][4].replace(",", "")) > 100 * int(rows[1][4].replace(",", "")) / 2, out


def test_the_upstream_storm_runs_and_the_connections_stay_within_the_bound():
    out = _script("upstreamstorm.py", "--clients", "30", "--max-connections", "4")
    result = json.loads(out.splitlines()[-1])
    assert result["answers"] == {"200": 30}, result
    assert 1 <= result["most_upstream_connections_at_once"] <= 4, result


def test_the_reconnect_storm_runs_on_both_listeners_and_both_backlogs():
    out = _script("storm.py", "--clients", "100")
    rows = [line.split("|")[1:3] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["status", "50"], ["licensing", "50"], ["status", "4096"], ["licensing", "4096"]
    ], out
    assert out.count("| 100 of 100 |") == 4, out  # every client answered


def test_the_pipeline_figures_run_and_every_answer_arrives_in_order():
    out = _script("pipeline.py", "--requests", "100", "--answer-kib", "128")
    assert "then read 100 of 100 answers" in out and "in order" in out, out
