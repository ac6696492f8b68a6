"""
Draws overview-day.png, docs/status.md's picture of a whole day, with the page's own code
and made-up samples: 100 containers checking in a minute, a 3.5 h outage of the license
server against a 3 h trust window (TrustBased, then Failed), then the license server back.
Run from the repository: ``.venv/bin/python docs/images/overview-day.py`` (needs chromium).
"""

import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from twisted.trial.unittest import SynchronousTestCase  # noqa: E402

from license_proxy.overview import Overview  # noqa: E402
from license_proxy.timeline import EVERY, SAMPLES, Timeline  # noqa: E402
from tests.support.relayharness import RelayHarness  # noqa: E402

TRUST = 3 * 3600


def main() -> None:
    case = SynchronousTestCase()
    h = RelayHarness(case)
    h.status._duration = TRUST  # the harness's Status has its own window
    h.answer(case, h.request())
    timeline = Timeline(h.clock, h.status, h.metrics.outcomes)
    rnd = random.Random(7)
    count = h.metrics.outcomes.labels
    for minute in range(SAMPLES):
        if 780 <= minute < 990:
            h.status.failed()
            if h.status.trusted():
                count("served_from_trust").inc(rnd.randint(95, 105))
                count("unavailable").inc(rnd.randint(0, 2))
            else:
                count("unavailable").inc(rnd.randint(95, 105))
        else:
            h.status.succeeded()
            count("upstream_ok").inc(rnd.randint(95, 105))
            if rnd.random() < 0.02:
                count("upstream_4xx").inc()
        if rnd.random() < 0.01:
            count("rejected").inc(rnd.randint(1, 5))
        h.clock.advance(EVERY)
        timeline.sample()
    page = Overview(
        h.clock, h.clock, h.status, h.cache, h.upstream.health.servers, timeline, "0.1.0", TRUST
    ).render()
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "day.html"
        html.write_text(page)
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}/profile", "--window-size=1200,960", "--hide-scrollbars",
             f"--screenshot={Path(__file__).with_suffix('.png')}", html.as_uri()],
            check=True, capture_output=True, timeout=60,
        )


if __name__ == "__main__":
    main()
