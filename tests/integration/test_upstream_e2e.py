"""
End to end, a kept-alive connection to the license server that the server
closed: a real ``twistd license-proxy``, the real TLS upstream, real sockets.
"""

from __future__ import annotations

import http.client
import signal
import ssl
import threading
import time

import pytest

from tests.support.configs import config
from tests.support.metrics import scrape
from tests.support.proxy import ProxyProcess
from tests.support.upstream import relayed


@pytest.mark.parametrize(
    "method, closing, attempts, trusted",
    [
        # The upstream closes a kept-alive connection as the next request arrives.
        ("GET", "close_reused", 2, False),  # sent again on a new connection: a fresh answer
        ("POST", "close_reused", 1, True),  # it may have reached the server: never sent twice
        # The upstream closes it while idle (a short keep-alive): it is not used at all.
        ("POST", "idle", 1, False),
    ],
)
def test_a_pooled_connection_the_upstream_closed(tmp_path, pki, upstream, method, closing, attempts, trusted):
    if closing == "idle":
        upstream.idle_timeout = 0.3
    # No periodic check-in: the proxy's requests are the test's alone.
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url)) as proxy:
        proxy.wait_state("Connected")
        if closing == "idle":
            _wait_until_all_closed_idle(upstream)  # the first request opens a new connection
        assert proxy.request(method, "/v1/lic", body=b"{}")[0] == 200
        if closing == "idle":
            _wait_until_all_closed_idle(upstream)
        else:
            upstream.mode = closing
        code, headers, body = proxy.request(method, "/v1/lic", body=b"{}")
        log = proxy.log_text()
        retries = scrape(proxy)["license_proxy_upstream_retries_total", ()]
    assert code == 200
    assert ("Age" in headers) is trusted
    assert len(relayed(upstream, "/v1/lic")) == 1 + attempts
    retried = f"{method} to localhost: the pooled connection was closed before any answer"
    assert (retried in log) is (attempts == 2), log
    assert retries == attempts - 1


def _wait_until_all_closed_idle(upstream, timeout=10):
    deadline = time.monotonic() + timeout
    while upstream.idle_closes < upstream.handshakes and time.monotonic() < deadline:
        time.sleep(0.02)
    assert upstream.idle_closes == upstream.handshakes


def test_a_close_the_proxy_has_not_read_yet_loses_no_post(tmp_path, pki, upstream):
    # A container's POST reaches the proxy, then the upstream closes the kept-alive
    # connection that waits in the proxy's pool, both before the proxy looks at its sockets
    # again (it is stopped meanwhile): it reads the POST first, with the close still unread.
    with ProxyProcess(tmp_path, config(tmp_path, pki, upstream.url)) as proxy:
        proxy.wait_state("Connected")  # the start-up check-in's connection waits in the pool
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        kept = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=10, context=context)
        kept.connect()
        proxy.process.send_signal(signal.SIGSTOP)
        try:
            kept.request("POST", "/v1/lic", body=b"{}")
            upstream.stop()
            upstream.start()
        finally:
            proxy.process.send_signal(signal.SIGCONT)
        response = kept.getresponse()
        response.read()
        kept.close()
        log = proxy.log_text()
    # Sent once, on a new connection, and answered: not lost, not served from trust.
    assert (response.status, response.getheader("Age")) == (200, None)
    assert [r.method for r in relayed(upstream, "/v1/lic")] == ["POST"]
    assert "POST to localhost: the pooled connection was closed before the request went out" in log



BOUND = 4
BURST = 24


def test_a_burst_opens_no_more_connections_to_the_license_server_than_the_bound(
    tmp_path, pki, upstream
):
    """A fleet arriving at once (issue 20: 389 connections at once for 1,000 clients) waits
    for the bounded connections; the license server sees ``max_connections`` at most."""
    text = config(
        tmp_path, pki, upstream.url,
        license=f'max_connections = {BOUND}\nanswer_within = "8s"',
    ).replace('timeout = "2s"\n', 'timeout = "20s"\n')
    with ProxyProcess(tmp_path, text) as proxy:
        proxy.wait_state("Connected")
        upstream.mode = "hang"
        answers: list = []
        clients = [
            threading.Thread(
                target=lambda n=n: answers.append(proxy.request("GET", f"/v1/lic/{n}", timeout=30))
            )
            for n in range(BURST)
        ]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 10
        while len(upstream.requests) < 1 + BOUND and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # time for any more to arrive
        held = len(upstream.requests) - 1
        metrics = scrape(proxy)
        upstream.mode = "normal"
        for client in clients:
            client.join(timeout=30)
    assert held == BOUND
    assert upstream.most_open <= BOUND, upstream.most_open
    assert [code for code, _, _ in answers] == [200] * BURST
    url = (("server_url", upstream.url),)
    assert metrics["license_proxy_upstream_connections", url] == BOUND
    assert metrics["license_proxy_upstream_waiting", url] == BURST - BOUND
