"""
``license-proxy-status``: asks a running proxy for its state and says it in
words, with an exit status for cron and Nagios-style checks:

    0  Connected
    1  TrustBased (the license server is away; cached answers are served)
    2  Failed, Ready, unreachable, or TrustBased for longer than --warn-after

A plain blocking HTTP request: this is a short-lived command, not the proxy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Optional

from .config import parse_duration, span

OK, WARNING, CRITICAL = 0, 1, 2
_EXIT = {"Connected": OK, "TrustBased": WARNING}

# Straight to the proxy: an HTTP_PROXY in the environment must not intercept it.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="license-proxy-status",
        description="Print a license-proxy's state; exit 0 Connected, 1 TrustBased, "
        "2 Failed, Ready or unreachable.",
    )
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8080",
        help="the proxy's status listener (default: %(default)s)",
    )
    parser.add_argument(
        "--warn-after",
        type=_duration,
        metavar="DURATION",
        help='exit 2 when TrustBased for longer than this (e.g. "1h")',
    )
    parser.add_argument(
        "--timeout", type=_duration, default=5.0, metavar="DURATION", help="default: 5s"
    )
    args = parser.parse_args(argv)
    url = args.url.rstrip("/") + "/v1/status"
    try:
        line, code = judge(fetch(url, args.timeout), time.time(), args.warn_after)
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        # Unreachable, or an answer that is not a status: UNKNOWN, never a traceback.
        print(f"UNKNOWN: {url}: {_reason(e)}")
        return CRITICAL
    print(line)
    return code


def _duration(text: str) -> float:
    try:
        return parse_duration(float(text) if text.replace(".", "", 1).isdigit() else text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def fetch(url: str, timeout: float) -> dict:
    with _direct.open(url, timeout=timeout) as response:
        report = json.loads(response.read())
    if not isinstance(report, dict) or not isinstance(report.get("state"), str):
        raise ValueError("not a license-proxy status answer")
    return report


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return str(e.reason)
    return str(e)


def judge(report: dict, now: float, warn_after: Optional[float]) -> tuple[str, int]:
    """The line to print and the exit status, from a status report at ``now``."""
    state = report["state"]
    code = _EXIT.get(state, CRITICAL)
    words = [state]
    since = _seconds(report.get("state_since"))
    if since is not None:
        words.append(f"for {span(now - since)}")
        if state == "TrustBased" and warn_after is not None and now - since > warn_after:
            code = CRITICAL
    last = _seconds(report.get("last_successful_checkin"))
    words.append(
        "; never checked in" if last is None else f"; last check-in {span(now - last)} ago"
    )
    expiration = _seconds(report.get("trust_expiration"))
    if expiration is not None:
        left = expiration - now
        when = report["trust_expiration"]
        words.append(
            f"; trust expires in {span(left)} ({when})"
            if left > 0
            else f"; trust expired {span(-left)} ago ({when})"
        )
    return " ".join(words).replace(" ;", ";"), code


def _seconds(rfc3339: Optional[str]) -> Optional[float]:
    if not rfc3339:
        return None
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    sys.exit(main())
