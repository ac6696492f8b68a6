"""
The page at ``/`` in a real browser (Debian's headless Chromium) against a real proxy and a
real license server: Connected, TrustBased with its countdown, then Failed.  Each load checks
the DOM Chromium rendered, that its console reports no Content-Security-Policy violation (the
policy blocks nothing the page needs), and takes a screenshot (``LICENSE_PROXY_SCREENSHOTS``:
a directory to keep them in, as docs/status.md's were made).  Also: the page, fetched raw,
holds none of the secrets this test sent through the proxy.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.configs import KEY, config
from tests.support.proxy import TEST_KEY, ProxyProcess

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
)
#: Credentials and paths sent through the proxy below: none may appear on the page.
AUTHORIZATION = "Bearer browser-test-secret-9d1c"
API_KEY = "xk-browser-test-4471"
PATHS = ("/v1/licensee-3be2/check-in?token=tok-77aa", "/v2/usage/engine-19")


def chromium(tmp_path: Path, url: str, *extra: str) -> tuple[str, str]:
    """Chromium's stdout and stderr for ``url``; a missing Chromium fails (.ci/run installs it)."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium not found: install Debian's chromium package (.ci/run does)")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    done = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def load(tmp_path: Path, url: str, name: str) -> str:
    """The rendered DOM's text, after checking the console and taking a screenshot."""
    dom, log = chromium(tmp_path, url, "--dump-dom")
    assert "Content Security Policy" not in log and "Refused to" not in log, log
    keep = Path(os.environ.get("LICENSE_PROXY_SCREENSHOTS", tmp_path))
    shot = keep / f"overview-{name}.png"
    chromium(tmp_path, url, f"--screenshot={shot}", "--window-size=1200,900",
             "--hide-scrollbars")
    assert shot.read_bytes().startswith(b"\x89PNG"), shot
    assert "<svg" in dom  # the inline SVG was parsed as such
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_the_page_in_a_browser_connected_trustbased_failed(tmp_path, pki, upstream):
    text = config(
        tmp_path, pki, upstream.url, license=f'key = "{KEY}"',
        trust='duration = "25s"\ncheckin_interval = "1s"',
    )
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        headers = {"Authorization": AUTHORIZATION, "X-Api-Key": API_KEY}
        for path in PATHS:
            assert proxy.request("GET", path, headers=headers)[0] == 200
        url = f"http://127.0.0.1:{proxy.status_port}/"

        words = load(tmp_path, url, "connected")
        assert "Connected : the license server answers." in words, words
        assert upstream.url in words and " up " in words, words
        assert "answers held 2" in words, words

        upstream.stop()
        assert proxy.request("GET", PATHS[0], headers=headers)[0] == 200  # from trust
        proxy.wait_state("TrustBased")
        words = load(tmp_path, url, "trustbased")
        assert re.search(
            r"TrustBased since \d\d:\d\d UTC — the fleet stays licensed until \d\d:\d\d UTC"
            r" without the license server \(\d+s left\)", words,
        ), words
        assert re.search(r"\d+s left of 25s, until \d\d:\d\d UTC", words), words
        assert "DOWN since" in words, words

        page = urllib.request.urlopen(url, timeout=10).read().decode()
        for secret in (KEY, TEST_KEY, AUTHORIZATION, API_KEY, "browser-test", *PATHS,
                       "licensee-3be2", "tok-77aa", "engine-19"):
            assert secret not in page, secret

        proxy.wait_state("Failed", timeout=40)
        words = load(tmp_path, url, "failed")
        assert "Failed since" in words and "containers are not being licensed" in words, words
        assert "expired at" in words, words
