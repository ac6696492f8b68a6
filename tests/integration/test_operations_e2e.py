"""
End to end, what operators watch: ``/metrics``, ``/v1/ready`` and
``/v1/health`` and ``license-proxy-status`` through a real proxy's states,
JSON log lines of a real run, and certificates reloaded on SIGHUP or when
their files change (a Kubernetes Secret volume updated in place).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import time
from datetime import datetime, timezone

from license_proxy.tls.certs import issue, make_ca
from license_proxy.tls.reload import CHECK_INTERVAL
from tests.support.configs import KEY, config
from tests.support.metrics import get, scrape
from tests.support.pki import LOCAL
from tests.support.installed import script
from tests.support.proxy import ProxyProcess, free_port
from tests.support.secretvolume import SecretVolume
from tests.support.upstream import Upstream, relayed


def state_of(metrics) -> str:
    (state,) = [dict(l)["state"] for (n, l), v in metrics.items() if n == "license_proxy_state" and v == 1]
    return state


def status_command(*args) -> tuple[int, str]:
    """``license-proxy-status`` as a script would run it: exit status and output."""
    done = subprocess.run(
        [script("license-proxy-status"), *args], capture_output=True, text=True, timeout=30
    )
    return done.returncode, done.stdout + done.stderr


def test_metrics_probes_and_the_status_command_through_every_state(tmp_path, pki, upstream):
    upstream.mode = "blackhole"  # the first check-in hangs: the proxy stays Ready meanwhile
    text = config(
        tmp_path, pki, upstream.url,
        license='timeout = "4s"\nstartup_timeout = "60s"',
        trust='duration = "5s"\ncheckin_interval = "1s"',
    ).replace('timeout = "2s"\nstartup_timeout = "3s"\n', "")
    with ProxyProcess(tmp_path, text) as proxy:
        url = f"--url=http://{proxy.host}:{proxy.status_port}"
        proxy.wait_state("Ready")
        code, out = status_command(url)
        assert (code, out.split()[0]) == (2, "Ready"), out
        assert "never checked in" in out
        assert get(proxy, "/v1/ready")[0] == 503
        assert get(proxy, "/v1/health") == (200, b'{"alive":true}\n')
        assert state_of(scrape(proxy)) == "Ready"

        upstream.mode = "normal"
        proxy.wait_state("Connected", timeout=20)
        assert proxy.request("GET", "/v1/lic")[0] == 200
        code, out = status_command(url)
        assert code == 0 and out.startswith("Connected for "), out
        assert get(proxy, "/v1/ready")[0] == 200
        m = scrape(proxy)
        assert state_of(m) == "Connected"
        assert m["license_proxy_relays_total", (("outcome", "upstream_ok"),)] == 1
        assert m["license_proxy_upstream_latency_seconds_count", ()] == 1
        assert 0 <= m["license_proxy_seconds_since_last_checkin", ()] < 3
        assert 2 < m["license_proxy_trust_remaining_seconds", ()] <= 5
        assert m["license_proxy_cache_entries", ()] == 1

        upstream.stop()
        assert proxy.request("GET", "/v1/lic")[0] == 200  # from the trust cache
        proxy.wait_state("TrustBased")
        code, out = status_command(url)
        assert code == 1 and out.startswith("TrustBased for "), out
        assert "trust expires in" in out
        code, out = status_command(url, "--warn-after", "0.001s")
        assert code == 2 and out.startswith("TrustBased"), out
        assert get(proxy, "/v1/ready")[0] == 200
        m = scrape(proxy)
        assert state_of(m) == "TrustBased"
        assert m["license_proxy_relays_total", (("outcome", "served_from_trust"),)] == 1

        proxy.wait_state("Failed", timeout=10)
        code, out = status_command(url)
        assert code == 2 and out.startswith("Failed for "), out
        assert "trust expired" in out
        assert get(proxy, "/v1/ready")[0] == 503
        assert proxy.request("GET", "/v1/lic")[0] == 502
        assert proxy.request("GET", "/v1/../x")[0] in (400, 404)
        m = scrape(proxy)
        assert state_of(m) == "Failed"
        assert m["license_proxy_trust_remaining_seconds", ()] < 0
        assert m["license_proxy_relays_total", (("outcome", "unavailable"),)] == 1
        assert m["license_proxy_relays_total", (("outcome", "rejected"),)] == 1

    code, out = status_command(f"--url=http://127.0.0.1:{free_port()}")
    assert code == 2 and out.startswith("UNKNOWN: "), out


def test_json_logs_one_object_per_line_and_no_secret(tmp_path, pki, upstream):
    text = config(tmp_path, pki, upstream.url, license=f'key = "{KEY}"')
    with ProxyProcess(tmp_path, text, options=("--log-format", "json")) as proxy:
        proxy.wait_state("Connected")
        check = dict(
            method="POST", path="/v1/check?token=query-secret", body=b"{}",
            headers={"Authorization": "Token client-secret"},
        )
        assert proxy.request(**check)[0] == 200
        upstream.mode = "reset"
        assert proxy.request(**check)[0] == 200  # from the trust cache
        assert proxy.terminate() in (0, -15)
    log = proxy.log_text()
    lines = [json.loads(line) for line in log.splitlines()]  # every line is one object
    assert all({"time", "level", "namespace", "message"} <= set(line) for line in lines)
    (changed,) = [line for line in lines if line.get("new") == "Connected"]
    assert (changed["old"], changed["level"]) == ("Ready", "info")
    ok, failed = [line for line in lines if line.get("path") == "/v1/check"]
    assert failed["method"] == "POST"
    assert (ok["method"], ok["status"], ok["outcome"], ok["cache"]) == ("POST", 200, "upstream_ok", "stored")
    assert isinstance(ok["ms"], float) and ok["level"] == "info"
    assert (failed["outcome"], failed["cache"], failed["level"]) == ("served_from_trust", "hit", "warn")
    for secret in (KEY, "client-secret", "query-secret"):
        assert secret not in log


def _pem(proxy) -> str:
    return ssl.get_server_certificate((proxy.host, proxy.port)).strip()


def _keep_open(proxy, cafile) -> http.client.HTTPSConnection:
    """A connection to the licensing listener, used once and kept open."""
    kept = http.client.HTTPSConnection(
        proxy.host, proxy.port, timeout=10, context=ssl.create_default_context(cafile=cafile)
    )
    kept.request("GET", "/v1/before")
    assert kept.getresponse().read()
    return kept


def _still_works(kept: http.client.HTTPSConnection, sock) -> None:
    """``kept`` answers again, on the same socket (not silently reconnected)."""
    kept.request("GET", "/v1/after")
    response = kept.getresponse()
    assert response.status == 200 and response.read()
    assert kept.sock is sock


def _wait(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sighup_reloads_the_listener_certificate_and_keeps_connections(tmp_path, pki, upstream):
    now = datetime.now(timezone.utc)
    cert, key = tmp_path / "listener.crt", tmp_path / "listener.key"
    first = issue(pki.pairs["ca"], LOCAL, now=now)
    first.write(cert, key)
    text = config(tmp_path, pki, upstream.url, server=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    with ProxyProcess(tmp_path, text, ca_file=pki.ca_cert) as proxy:
        proxy.wait_state("Connected")
        assert _pem(proxy) == first.cert_pem.decode().strip()
        kept = _keep_open(proxy, pki.ca_cert)
        sock = kept.sock
        assert sock is not None

        second = issue(pki.pairs["ca"], LOCAL, now=now)
        second.write(cert, key)
        proxy.process.send_signal(signal.SIGHUP)
        _wait(lambda: _pem(proxy) == second.cert_pem.decode().strip())
        # The connection opened before the reload is still open and still works.
        _still_works(kept, sock)
        assert ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True)).strip() == (
            first.cert_pem.decode().strip()
        )
        assert [r.path for r in upstream.requests][-2:] == ["/v1/before", "/v1/after"]
        kept.close()

        cert.write_text("not a certificate")
        proxy.process.send_signal(signal.SIGHUP)
        _wait(lambda: "keeping the licensing listener's certificate" in proxy.log_text())
        assert "[server] tls_cert: no PEM certificate" in proxy.log_text()
        assert _pem(proxy) == second.cert_pem.decode().strip()
        assert proxy.request("GET", "/v1/still")[0] == 200
        assert proxy.running


def test_sighup_reloads_the_upstream_trust_roots(tmp_path, pki, upstream):
    ca_file = tmp_path / "roots.pem"
    ca_file.write_bytes(pki.pairs["ca"].cert_pem)
    with Upstream(pki.unknown_ca_server_cert, pki.unknown_ca_server_key) as other:
        text = config(tmp_path, pki, other.url, license="").replace(
            f'server_url = "{other.url}"\nca_file = "{pki.ca_cert}"',
            f'server_url = ["{other.url}", "{upstream.url}"]\nca_file = "{ca_file}"',
        )
        with ProxyProcess(tmp_path, text) as proxy:
            proxy.wait_state("Connected")  # through the second URL: the first is not trusted
            assert proxy.request("GET", "/v1/a")[0] == 200
            assert other.requests == []

            ca_file.write_bytes(pki.pairs["ca"].cert_pem + pki.pairs["unknown_ca"].cert_pem)
            proxy.process.send_signal(signal.SIGHUP)
            _wait(lambda: "trust roots and client certificate are reloaded" in proxy.log_text())
            assert proxy.request("GET", "/v1/b")[0] == 200
            assert [r.path for r in other.requests] == ["/v1/b"]


#: How long a change on disk may take to be in service: the check interval, and room for a
#: loaded machine.
PICKED_UP = CHECK_INTERVAL + 15


def test_a_secret_volume_update_changes_the_listener_certificate_without_sighup(
    tmp_path, pki, upstream
):
    ca, now = pki.pairs["ca"], datetime.now(timezone.utc)
    volume = SecretVolume(tmp_path / "listener-tls")
    first = issue(ca, LOCAL, now=now)
    volume.update({"tls.crt": first.cert_pem, "tls.key": first.key_pem})
    text = config(
        tmp_path, pki, upstream.url,
        server=f'tls_cert = "{volume.path("tls.crt")}"\ntls_key = "{volume.path("tls.key")}"',
    )
    with ProxyProcess(tmp_path, text, ca_file=pki.ca_cert) as proxy:
        proxy.wait_state("Connected")
        assert _pem(proxy) == first.cert_pem.decode().strip()
        kept = _keep_open(proxy, pki.ca_cert)
        sock = kept.sock

        second = issue(ca, LOCAL, now=now)
        volume.update({"tls.crt": second.cert_pem, "tls.key": second.key_pem})
        _wait(lambda: _pem(proxy) == second.cert_pem.decode().strip(), PICKED_UP)
        assert proxy.request("GET", "/v1/new")[0] == 200  # verified against the CA
        _still_works(kept, sock)
        assert ssl.DER_cert_to_PEM_cert(sock.getpeercert(binary_form=True)).strip() == (
            first.cert_pem.decode().strip()
        )
        kept.close()

        third = issue(ca, LOCAL, now=now)
        volume.update({"tls.crt": third.cert_pem, "tls.key": second.key_pem})  # a mismatched pair
        _wait(lambda: "does not match the certificate" in proxy.log_text(), PICKED_UP)
        assert _pem(proxy) == second.cert_pem.decode().strip()
        assert proxy.request("GET", "/v1/still")[0] == 200
        volume.update({"tls.crt": third.cert_pem, "tls.key": third.key_pem})
        _wait(lambda: _pem(proxy) == third.cert_pem.decode().strip(), PICKED_UP)
        log = proxy.log_text()
        changed = "reload (files changed): "
        assert log.count(changed + "keeping the licensing listener's certificate") == 1
        assert log.count(changed + "the licensing listener's certificate and key are") == 2
        assert "SIGHUP" not in log


def _upstream_files(ca, client) -> dict[str, bytes]:
    return {"ca.crt": ca.cert_pem, "tls.crt": client.cert_pem, "tls.key": client.key_pem}


def test_a_secret_volume_update_changes_the_upstream_roots_and_client_certificate(tmp_path, pki):
    now = datetime.now(timezone.utc)
    volume = SecretVolume(tmp_path / "upstream-tls")
    volume.update(_upstream_files(pki.pairs["ca"], pki.pairs["client"]))
    new_ca = make_ca("rotated license server CA", now=now)
    new_client = issue(pki.pairs["client_ca"], ["rotated-client"], now=now, client=True)
    new_server = tmp_path / "new-server"
    issue(new_ca, LOCAL, now=now).write(f"{new_server}.crt", f"{new_server}.key")
    with Upstream(pki.server_cert, pki.server_key, client_ca_path=pki.client_ca_cert) as up:
        text = config(
            tmp_path, pki, up.url,
            license=f'client_cert = "{volume.path("tls.crt")}"\n'
            f'client_key = "{volume.path("tls.key")}"',
        ).replace(f'ca_file = "{pki.ca_cert}"', f'ca_file = "{volume.path("ca.crt")}"')
        with ProxyProcess(tmp_path, text) as proxy:
            proxy.wait_state("Connected")
            assert up.requests[0].client_cn == pki.client_cn

            # The license server moves to a certificate from a CA the proxy does not trust yet.
            up.stop()
            up.use_certificate(f"{new_server}.crt", f"{new_server}.key")
            up.start()
            assert proxy.request("GET", "/v1/before")[0] == 502
            assert relayed(up, "/v1/before") == []

            volume.update(_upstream_files(new_ca, new_client))
            _wait(lambda: "roots and client certificate are reloaded" in proxy.log_text(), PICKED_UP)
            assert proxy.request("GET", "/v1/after")[0] == 200
            (seen,) = relayed(up, "/v1/after")
            assert seen.client_cn == "rotated-client"


def test_a_fifo_or_dev_zero_as_the_certificate_leaves_the_proxy_answering(tmp_path, pki, upstream):
    """Issue 20 item 5: the watcher read the files on the event loop; a FIFO blocked it for
    ever, /dev/zero never ended the read, and the relay and status stopped answering."""
    cert, key = tmp_path / "listener.crt", tmp_path / "listener.key"
    first = issue(pki.pairs["ca"], LOCAL, now=datetime.now(timezone.utc))
    first.write(cert, key)
    text = config(tmp_path, pki, upstream.url, server=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    with ProxyProcess(tmp_path, text, ca_file=pki.ca_cert) as proxy:
        proxy.wait_state("Connected")
        for n, replace in enumerate((os.mkfifo, lambda path: os.symlink("/dev/zero", path))):
            cert.unlink()
            replace(cert)
            line = (
                "reload (files changed): keeping the licensing listener's certificate:"
                f" [server] tls_cert: cannot read {cert}: not a regular file"
            )
            _wait(lambda: proxy.log_text().count(line) == n + 1, PICKED_UP)
            time.sleep(CHECK_INTERVAL + 1)  # checked again: not said twice, still answering
            assert proxy.log_text().count(line) == n + 1
            assert proxy.status(timeout=2)["state"] == "Connected"
            assert proxy.request("GET", f"/v1/still-{n}")[0] == 200
            assert _pem(proxy) == first.cert_pem.decode().strip()  # the old one, kept
            cert.unlink()
            first.write(cert, key)  # a good file again: taken (the next round is a change)
            reloaded = "reload (files changed): the licensing listener's certificate and key are"
            _wait(lambda: proxy.log_text().count(reloaded) == n + 1, PICKED_UP)
