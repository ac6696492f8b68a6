"""
bench/fleet.py's accounting of a day, on check-ins made up for it: which failures are inside
the trust window (N), which after it (M), and a check-in licensed past the window's close is
caught (M inconsistent).  The day itself is tests/slow/test_fleet.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

_spec = importlib.util.spec_from_file_location("fleet", Path(__file__).resolve().parents[2] / "bench" / "fleet.py")
fleet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet)


def day(answered, records):
    """One real second a simulated minute: the trust window is TRUST_MINUTES seconds."""
    return SimpleNamespace(
        minute=1.0, t0=0.0, sim=lambda t: t, server=SimpleNamespace(answered=answered),
        fleet=SimpleNamespace(records=records),
    )


def test_failures_inside_and_after_the_window_and_a_licence_past_it():
    window = fleet.TRUST_MINUTES
    last, back = 10.0, 10.0 + window + 15  # the license server is away for longer than the window
    close = last + window
    records = [
        ["ok inside", 5.0, 5.1, True, ""],
        ["failed inside", 12.0, 12.1, False, "502"],
        ["failed just before the close", close - 0.5, close - 0.4, False, "502"],
        ["failed after", close + 5, close + 5.1, False, "client timeout"],
        ["licensed after the close", close + 5, close + 5.1, True, ""],
        ["licensed as the server returns", back - 0.5, back + 0.2, True, ""],
        ["failed as the server returns", back + 0.5, back + 0.6, False, "connection"],
        ["failed once it is back", back + 2, back + 2.1, False, "502"],
    ]
    verdict = fleet.judge(day([float(t) for t in range(11)] + [back], records))
    assert (verdict["n"], verdict["m"]) == (2, 3)
    assert verdict["violations"] == [["licensed after the close", close + 5]]
    windows = {row[0]: row[5] for row in verdict["rows"]}
    assert windows["failed inside"] == windows["failed once it is back"] == "inside"
    assert windows["failed just before the close"] == windows["failed after"] == "after"
    assert fleet.closes(day([float(t) for t in range(11)] + [back], [])) == [(close, back)]
