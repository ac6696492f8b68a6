"""license-proxy-status's verdict from a status report (the command against real proxies is in test_e2e)."""

from __future__ import annotations

import pytest

from license_proxy.statuscmd import judge

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def report(state, since="2027-01-15T07:30:00.000000Z", last="2027-01-15T07:30:00.000000Z",
           expiration="2027-01-16T07:30:00.000000Z"):
    return {"state": state, "last_successful_checkin": last, "trust_expiration": expiration,
            "state_since": since}


@pytest.mark.parametrize(
    "state, warn_after, code",
    [
        ("Connected", None, 0),
        ("TrustBased", None, 1),
        ("TrustBased", 3600.0, 1),  # 30 minutes so far
        ("TrustBased", 1200.0, 2),
        ("Failed", None, 2),
        ("Ready", None, 2),
    ],
)
def test_exit_status(state, warn_after, code):
    assert judge(report(state), NOW, warn_after)[1] == code


def test_the_line_says_how_long_and_when_trust_expires():
    line, _ = judge(report("TrustBased"), NOW, None)
    assert line == (
        "TrustBased for 30m; last check-in 30m ago; "
        "trust expires in 23h30m (2027-01-16T07:30:00.000000Z)"
    )
    line, _ = judge(report("Ready", since="2027-01-15T07:59:53.000000Z", last=None, expiration=None), NOW, None)
    assert line == "Ready for 7s; never checked in"


def test_a_vendor_proxy_without_state_since_is_judged_by_its_state():
    vendor = report("TrustBased")
    del vendor["state_since"]
    line, code = judge(vendor, NOW, 60.0)
    assert code == 1 and line.startswith("TrustBased; last check-in")


def test_an_answer_that_is_not_a_status_is_unknown_not_a_traceback(capsys):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from license_proxy.statuscmd import main

    class Odd(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"state": "TrustBased", "last_successful_checkin": 5,
                               "trust_expiration": None, "state_since": 7}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = main([f"--url=http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert code == 2
    assert capsys.readouterr().out.startswith("UNKNOWN: ")
