"""
The clocks of a real ``twistd license-proxy``: a trust cache written ahead of the wall clock
gives no more than its window, and a wall clock set back (libfaketime, the proxy's alone)
moves neither its timers nor the dates it reports.  The same rules on injected clocks are
tests/unit/test_clock.py.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime

import pytest

from license_proxy.status import rfc3339
from tests.support.configs import config
from tests.support.proxy import ProxyProcess, free_port

#: Seconds over each bound for a loaded, shared machine (a start-up, a scheduling delay): what
#: these tests guard against is a wait of a day or of half an hour, not of seconds.
MARGIN = 8


@pytest.mark.parametrize("with_mark", [True, False], ids=["with mark", "old format"])
def test_a_real_proxy_on_a_cache_from_the_future_fails_when_its_window_closes(
    tmp_path, pki, with_mark
):
    """A cache written a day ahead of the wall clock: trust lasts the window, not a day more."""
    ahead = time.time() + 86400
    cache = {"format": 1, "last_successful_checkin": ahead, "salt": "00" * 16, "entries": {}}
    if with_mark:
        cache["clock_high_water"] = ahead + 1
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trust-cache.json").write_text(json.dumps(cache))
    nobody = f"https://127.0.0.1:{free_port()}"  # the license server is unreachable
    text = config(tmp_path, pki, nobody, trust='duration = "4s"\ncheckin_interval = "1s"')
    with ProxyProcess(tmp_path, text) as proxy:
        started = time.monotonic()
        proxy.wait_state("TrustBased")
        status = proxy.wait_state("Failed", timeout=10)
        assert time.monotonic() - started < 4 + MARGIN  # the window, not a day more
        assert status["trust_expiration"] == rfc3339(ahead + 4)
        assert "state TrustBased -> Failed" in proxy.log_text()


LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def test_a_real_proxy_whose_wall_clock_is_set_back_keeps_its_timers_and_its_dates(
    tmp_path, pki, upstream
):
    """
    The proxy's wall clock (only its own, through libfaketime) goes back half an hour: the
    periodic check-in goes on, the upstream deadline still ends a hung exchange on time, and
    the dates it reports do not go back.
    """
    if not os.path.exists(LIBFAKETIME):
        pytest.fail(f"{LIBFAKETIME} missing: apt-get install faketime (.ci/run does)")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    env = {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",  # read the offset at every call: the change is at once
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    # libfaketime reads its file at every clock call: on a loaded machine the start-up
    # check-in alone once took over the usual 3 s (what is tested here comes after it).
    text = config(tmp_path, pki, upstream.url, trust='duration = "1h"\ncheckin_interval = "1s"',
                  startup_timeout="30s")
    with ProxyProcess(tmp_path, text, env=env) as proxy:
        proxy.wait_state("Connected", timeout=40)
        assert proxy.request("GET", "/v1/lic")[0] == 200
        offset.write_text("-1800\n")
        seen = len(upstream.requests)
        deadline = time.monotonic() + 3 + MARGIN
        while len(upstream.requests) < seen + 3:  # check-ins every second, clock or not
            assert time.monotonic() < deadline, "the periodic check-in stopped"
            time.sleep(0.05)

        upstream.mode = "hang"  # reads each request, never answers
        started = time.monotonic()
        code, headers, body = proxy.request("GET", "/v1/lic", timeout=20)
        assert code == 200 and headers["Age"] is not None
        assert time.monotonic() - started < 2 + MARGIN  # [license] timeout = "2s", not 30 min
        status = proxy.wait_state("TrustBased")
        last = datetime.fromisoformat(status["last_successful_checkin"].replace("Z", "+00:00"))
        assert abs(last.timestamp() - time.time()) < 10, status  # not half an hour back
