"""
End to end, two real ``twistd license-proxy`` processes that are each other's peer (``[peers]
urls`` over verified TLS), in front of one real TLS license server, loopback only: a container
whose answer only one instance holds keeps its license through the other during an outage,
also once the first is gone; a peer that black-holes costs one ``answer_within``, then is
skipped; the peers' mark never reaches the license server.
"""

from __future__ import annotations

import time

from tests.support.blackhole import BlackHole
from tests.support.configs import config
from tests.support.metrics import scrape
from tests.support.proxy import ProxyProcess

ANSWER_WITHIN = 2.0
MARGIN = 3.0  # load on a shared 2-core machine
GOOD = b'{"license":"alice"}'


def pair(tmp_path, pki, upstream, extra_peers=()) -> tuple[ProxyProcess, ProxyProcess]:
    """Instances a and b, each the other's peer (after ``extra_peers``, for a)."""
    tls = f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"'
    a, b = (
        ProxyProcess(tmp_path / name, config(tmp_path / name, pki, upstream.url, server=tls),
                     ca_file=pki.ca_cert)
        for name in "ab"
    )
    for proxy, other, first in ((a, b, list(extra_peers)), (b, a, [])):
        proxy.tmp_path.mkdir()
        urls = ", ".join(f'"{url}"' for url in [*first, f"https://127.0.0.1:{other.port}/"])
        proxy.config_text += f'\n[peers]\nurls = [{urls}]\nca_file = "{pki.ca_cert}"\n'
    return a, b


def relays(proxy, outcome: str) -> float:
    return scrape(proxy).get(("license_proxy_relays_total", (("outcome", outcome),)), 0)


def ask(proxy, path="/v1/lic", token="Token alice"):
    started = time.monotonic()
    code, headers, body = proxy.request("GET", path, headers={"Authorization": token}, timeout=60)
    return time.monotonic() - started, code, headers, body


def test_an_answer_only_the_other_instance_holds_survives_the_outage_and_that_instance(
    tmp_path, pki, upstream
):
    a, b = pair(tmp_path, pki, upstream)
    with a, b:
        a.wait_state("Connected")
        b.wait_state("Connected")
        upstream.respond(body=GOOD)
        took, code, headers, body = ask(b)  # alice checks in through b only
        assert (code, body) == (200, GOOD) and "Age" not in headers
        upstream.stop()

        took, code, headers, body = ask(a)
        assert (code, body) == (200, GOOD), (code, body, a.log_text())
        assert "Age" in headers
        assert took < ANSWER_WITHIN + MARGIN, took
        assert relays(a, "served_by_peer") == 1
        assert relays(b, "served_from_trust") >= 1
        # A container no instance ever answered: one 502 from each, no loop between them.
        took, code, _, _ = ask(a, "/v1/never")
        assert code == 502
        assert relays(b, "unavailable") == 1

        b.kill()  # a kept alice's answer: b's going does not bring the gap back
        took, code, headers, body = ask(a)
        assert (code, body) == (200, GOOD) and "Age" in headers
        assert relays(a, "served_from_trust") >= 1
        # What the license server was sent never carried the peers' mark.
        assert upstream.requests
        assert not [r for r in upstream.requests if r.header("License-Proxy-Peer") is not None]


def test_a_black_holed_peer_costs_one_answer_within_then_is_skipped(tmp_path, pki, upstream):
    with BlackHole() as hole:
        a, b = pair(tmp_path, pki, upstream, extra_peers=[f"https://127.0.0.1:{hole.port}/"])
        with a, b:
            a.wait_state("Connected")
            b.wait_state("Connected")
            upstream.respond(body=GOOD)
            for token in ("Token alice", "Token carol"):
                assert ask(b, token=token)[1] == 200
            upstream.stop()
            took, code, _, body = ask(a)
            assert (code, body) == (200, GOOD)
            assert ANSWER_WITHIN - 0.1 < took < ANSWER_WITHIN + MARGIN, took
            took, code, _, body = ask(a, token="Token carol")
            assert (code, body) == (200, GOOD)
            assert took < 1.0, took  # the black hole is skipped: b answers at once
            assert "peer https://127.0.0.1:" in a.log_text() and "is down" in a.log_text()
