"""
End to end, two real ``twistd license-proxy`` processes that are each other's peer (``[peers]
urls`` over verified TLS, each presenting its peer certificate), in front of one real TLS
license server, loopback only: a container whose answer only one instance holds keeps its
license through the other during an outage, also once the first is gone; a peer that
black-holes costs one ``answer_within``, then is skipped; the peers' mark never reaches the
license server. A client without a peer certificate gains nothing by the mark: a revoked key
gets the license server's 401, never the 200 in trust; a marked POST reaches the license
server; a probe is no probe.
"""

from __future__ import annotations

import ssl
import time

import pytest

from tests.support.blackhole import BlackHole
from tests.support.configs import config
from tests.support.metrics import scrape
from tests.support.proxy import ProxyProcess, free_port

ANSWER_WITHIN = 2.0
MARGIN = 3.0  # load on a shared 2-core machine
GOOD = b'{"license":"alice"}'


def peers_section(pki, urls) -> str:
    listed = ", ".join(f'"{url}"' for url in urls)
    return (
        f'\n[peers]\nurls = [{listed}]\nca_file = "{pki.ca_cert}"\n'
        f'cert_file = "{pki.peer_cert}"\nkey_file = "{pki.peer_key}"\n'
    )


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
        proxy.config_text += peers_section(pki, [*first, f"https://127.0.0.1:{other.port}/"])
    return a, b


def push_missed(pusher: ProxyProcess, absent: ProxyProcess, timeout: float = 15.0) -> None:
    """Until ``pusher``'s push of what it stored (``peers.share``) found ``absent`` not there:
    then only asking can bring ``absent`` those answers."""
    line = f"peer https://127.0.0.1:{absent.port}/ is down"
    deadline = time.monotonic() + timeout
    while line not in pusher.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in pusher.log_text(), pusher.log_text()[-3000:]


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
    with b:
        b.wait_state("Connected")
        upstream.respond(body=GOOD)
        took, code, headers, body = ask(b)  # alice checks in through b only, a not there yet
        assert (code, body) == (200, GOOD) and "Age" not in headers
        push_missed(b, a)
        with a:
            a.wait_state("Connected")
            upstream.stop()

            took, code, headers, body = ask(a)
            assert (code, body) == (200, GOOD), (code, body, a.log_text())
            assert "Age" in headers
            assert took < ANSWER_WITHIN + MARGIN, took
            assert relays(a, "served_by_peer") == 1
            assert relays(b, "served_from_trust") >= 1
            # Visible: the status lists the peers after the vendor's fields, the metrics too.
            (seen,) = a.status()["peers"]
            assert (seen["url"], seen["up"], seen["received"]) == (f"https://127.0.0.1:{b.port}/", True, 1)
            assert seen["last_exchange"] is not None
            assert list(a.status())[:3] == ["state", "last_successful_checkin", "trust_expiration"]
            labels = (("peer", f"https://127.0.0.1:{b.port}/"),)
            assert scrape(a)[("license_proxy_peer_answers_received_total", labels)] == 1
            assert scrape(a)[("license_proxy_peer_up", labels)] == 1
            sent = lambda: b.status()["peers"][0]["sent"]  # noqa: E731
            deadline = time.monotonic() + 10  # b learns which peer asked by probing it once
            while sent() != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sent() == 1
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
        with b:  # the check-ins reach b only, a not there yet to be pushed them
            b.wait_state("Connected")
            upstream.respond(body=GOOD)
            for token in ("Token alice", "Token carol"):
                assert ask(b, token=token)[1] == 200
            push_missed(b, a)
            with a:
                a.wait_state("Connected")
                upstream.stop()
                took, code, _, body = ask(a)
                assert (code, body) == (200, GOOD)
                assert ANSWER_WITHIN - 0.1 < took < ANSWER_WITHIN + MARGIN, took
                took, code, _, body = ask(a, token="Token carol")
                assert (code, body) == (200, GOOD)
                assert took < 1.0, took  # the black hole is skipped: b answers at once
                assert "peer https://127.0.0.1:" in a.log_text() and "is down" in a.log_text()


def alone(tmp_path, pki, upstream) -> ProxyProcess:
    """An instance with peer settings whose one peer is not running."""
    tls = f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"'
    text = config(tmp_path, pki, upstream.url, server=tls)
    text += peers_section(pki, [f"https://127.0.0.1:{free_port()}/"])
    return ProxyProcess(tmp_path, text, ca_file=pki.ca_cert)


def test_a_mark_without_a_peer_certificate_gets_no_answer_from_trust(tmp_path, pki, upstream):
    """The revoked-key replay of issue 19: the license server's 401, never the 200 in trust."""
    with alone(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        upstream.respond(body=GOOD)
        assert ask(proxy)[1:4:2] == (200, GOOD)
        upstream.respond(status=401, body=b'{"error":"revoked"}')
        for mark in ("x", "", "ask"):
            sent = len(upstream.requests)
            code, headers, body = proxy.request(
                "GET", "/v1/lic", headers={"Authorization": "Token alice", "License-Proxy-Peer": mark}
            )
            assert (code, body) == (401, b'{"error":"revoked"}'), (mark, code, body)
            assert "Age" not in headers
            assert len(upstream.requests) == sent + 1
        # A usage POST with the mark reaches the license server.
        upstream.respond(body=b'{"ok":1}')
        code, _, _ = proxy.request(
            "POST", "/v1/usage", body=b'{"usage":1}',
            headers={"Authorization": "Token alice", "License-Proxy-Peer": "ask"},
        )
        assert code == 200
        assert [r.body for r in upstream.requests if r.method == "POST"] == [b'{"usage":1}']
        assert not [r for r in upstream.requests if r.header("License-Proxy-Peer") is not None]
        assert "without a peer certificate: the mark is ignored" in proxy.log_text()


def test_only_a_peer_certificate_makes_a_probe(tmp_path, pki, upstream):
    with alone(tmp_path, pki, upstream) as proxy:
        proxy.wait_state("Connected")
        probe = {"License-Proxy-Peer": "probe"}
        assert proxy.request("TRACE", "/admin", headers=probe)[0] == 405
        sent = len(upstream.requests)
        assert proxy.request("GET", "/v1/x", headers=probe)[0] == 200  # relayed, as any GET
        assert len(upstream.requests) == sent + 1
        # With the peers' certificate, the instance answers itself.
        peer = (pki.peer_cert, pki.peer_key)
        assert proxy.request("GET", "/", headers=probe, client_cert=peer)[0] == 204
        assert len(upstream.requests) == sent + 1
        # A client certificate from another CA fails the handshake; none is still fine.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            proxy.request("GET", "/", headers=probe, client_cert=(pki.client_cert, pki.client_key))
        assert proxy.request("GET", "/v1/x")[0] == 200


def test_a_replacement_during_an_outage_starts_on_its_peers_trust(tmp_path, pki, upstream):
    """Issue 19 item 4: a new instance (an empty state directory) that can't reach the
    license server starts TrustBased on the trust its peer holds, and serves through it."""
    a, b = pair(tmp_path, pki, upstream)
    with a:
        a.wait_state("Connected")
        upstream.respond(body=GOOD)
        assert ask(a)[1] == 200
        upstream.stop()
        with b:
            status = b.wait_state("TrustBased", timeout=30)
            assert status["last_successful_checkin"] == a.status()["last_successful_checkin"]
            assert status["trust_expiration"] == a.status()["trust_expiration"]
            took, code, headers, body = ask(b)
            assert (code, body) == (200, GOOD), b.log_text()[-3000:]
            assert "serving on a peer's trust" in b.log_text()
        a.kill()
        # With no peer to take trust from, the vendor's rule: a new instance fails.
        (tmp_path / "b" / "state").rename(tmp_path / "b" / "state.old")
        b.start()
        assert b.wait_exit(timeout=30) != 0
        assert "could not be reached" in b.log_text()


def test_an_answer_stored_on_one_instance_reaches_the_other(tmp_path, pki, upstream):
    """Issue 19 item 3: pushed on store, kept with its age; the other instance answers it from
    its own trust once the license server and the first instance are both gone."""
    a, b = pair(tmp_path, pki, upstream)
    with a, b:
        a.wait_state("Connected")
        b.wait_state("Connected")
        upstream.respond(body=GOOD)
        assert ask(a)[1] == 200  # alice checks in through a only
        deadline = time.monotonic() + 10  # within PUSH_DELAY, on a loaded machine
        while b.status()["peers"][0]["received"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.status()["peers"][0]["received"] == 1
        assert a.status()["peers"][0]["sent"] == 1
        upstream.stop()
        a.kill()
        took, code, headers, body = ask(b)
        assert (code, body) == (200, GOOD) and "Age" in headers
        assert relays(b, "served_from_trust") == 1 and relays(b, "served_by_peer") == 0
