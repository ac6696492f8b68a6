"""Reloading certificates in place: good files are taken, bad ones leave the old in service."""

from __future__ import annotations

import base64
import os
from datetime import datetime, timezone

import pytest

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory

from license_proxy.tls.certs import issue, make_ca
from license_proxy.config import Config, ConfigError
from license_proxy.tls.contexts import listener_options, peer_tls, upstream_tls
from license_proxy.tls.reload import (
    CHECK_INTERVAL,
    CertificateFiles,
    CertificateReload,
    ListenerTLS,
    watching,
)
from tests.support.pki import LOCAL
from tests.support.secretvolume import SecretVolume


def test_bad_new_files_keep_the_old_ones_and_good_ones_replace_them(tmp_path, pki):
    ca = tmp_path / "roots.pem"
    ca.write_bytes(pki.pairs["ca"].cert_pem)
    cert = tmp_path / "listener.crt"
    cert.write_bytes(pki.pairs["server"].cert_pem)
    config = Config(ca_file=str(ca), tls_cert=str(cert), tls_key=pki.server_key)
    listener = ListenerTLS(listener_options(config, 0))
    upstream = upstream_tls(config)
    reloaded = []
    reload = CertificateReload(
        Clock(), config, listener, upstream, CertificateFiles.read(config), reloaded.append
    )
    old_options, old_creator = listener.options, upstream.creatorForNetloc(b"localhost", 443)

    ca.write_text("garbage")
    cert.write_bytes(pki.pairs["wrong_host"].cert_pem)  # does not match the key
    with capturedLogs() as events:
        reload()
    lines = [formatEvent(e) for e in events]
    assert listener.options is old_options
    assert upstream.creatorForNetloc(b"localhost", 443) is old_creator
    assert any("keeping the licensing listener's certificate: [server] tls_key:" in l for l in lines), lines
    assert any("keeping the license server's trust roots" in l and "[license] ca_file" in l for l in lines)
    assert reloaded == []  # servers marked down stay down: the old roots are still in service

    ca.write_bytes(pki.pairs["ca"].cert_pem)
    cert.write_bytes(pki.pairs["server"].cert_pem)
    with capturedLogs() as events:
        reload()
    assert listener.options is not old_options
    assert upstream.creatorForNetloc(b"localhost", 443) is not old_creator
    assert len([e for e in events if "are reloaded" in formatEvent(e)]) == 2
    assert reloaded == ["certificates reloaded (SIGHUP)"]


def test_a_key_that_does_not_match_its_certificate_is_a_config_error(pki, tmp_path):
    mismatched = Config(tls_cert=pki.server_cert, tls_key=pki.wrong_host_key, cache_path=str(tmp_path / "c.json"))
    with pytest.raises(ConfigError, match=r"\[server\] tls_key: .* does not match the certificate"):
        listener_options(mismatched, 0.0)
    client = Config(client_cert=pki.client_cert, client_key=pki.server_key)
    with pytest.raises(ConfigError, match=r"\[license\] client_key: .* does not match the certificate"):
        upstream_tls(client)
    assert listener_options(Config(tls_cert=pki.server_cert, tls_key=pki.server_key), 0.0)


class Watched:
    """The proxy's certificates as ``make_service`` wires them, checked on a fake clock."""

    def __init__(self, config: Config) -> None:
        seen = CertificateFiles.read(config)
        self.listener = ListenerTLS(listener_options(config, 0)) if config.tls else None
        self.upstream = upstream_tls(config)
        self.clock = Clock()
        self.reloaded: list[str] = []
        self.reload = CertificateReload(
            self.clock, config, self.listener, self.upstream, seen, self.reloaded.append
        )
        watching(self.reload, self.clock).startService()

    def creator(self):
        return self.upstream.creatorForNetloc(b"localhost", 443)

    def checks(self, count: int = 1) -> list[str]:
        """What the log says over ``count`` more checks."""
        with capturedLogs() as events:
            for _ in range(count):
                self.clock.advance(CHECK_INTERVAL)
        return [formatEvent(e) for e in events]


def _files(pair, ca) -> dict[str, bytes]:
    return {"tls.crt": pair.cert_pem, "tls.key": pair.key_pem, "ca.crt": ca.cert_pem}


def test_a_secret_volume_flip_is_put_in_service_at_the_next_check(tmp_path, pki):
    ca, now = pki.pairs["ca"], datetime.now(timezone.utc)
    volume = SecretVolume(tmp_path / "tls")
    volume.update(_files(pki.pairs["server"], ca))
    watched = Watched(
        Config(
            tls_cert=volume.path("tls.crt"), tls_key=volume.path("tls.key"),
            ca_file=volume.path("ca.crt"),
        )
    )
    options, creator = watched.listener.options, watched.creator()
    for name in ("tls.crt", "tls.key", "ca.crt"):
        os.utime(volume.path(name))  # touched, not changed
    assert watched.checks(3) == []
    assert watched.listener.options is options

    second = issue(ca, LOCAL, now=now)
    volume.update(_files(second, ca))  # a new certificate and key; the same CA
    assert watched.checks() == [
        "reload (files changed): the licensing listener's certificate and key are reloaded"
    ]
    assert watched.listener.options.certificate == second.certificate
    assert watched.creator() is creator  # the CA's contents did not change: not reloaded
    assert watched.checks(3) == []


def test_half_written_and_mismatched_files_keep_the_old_ones_and_say_so_once(tmp_path, pki):
    now = datetime.now(timezone.utc)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.pairs["server"].write(cert, key)
    watched = Watched(Config(tls_cert=str(cert), tls_key=str(key)))
    first = watched.listener.options

    second = issue(pki.pairs["ca"], LOCAL, now=now)
    cert.write_bytes(second.cert_pem[:200])  # written in place, not yet whole
    (line,) = watched.checks(4)
    assert line.startswith("reload (files changed): keeping the licensing listener's certificate:")
    assert f"[server] tls_cert: no PEM certificate in {cert}" in line
    assert watched.listener.options is first

    cert.write_bytes(second.cert_pem)  # whole, but the key is still the old one
    (line,) = watched.checks(4)
    assert f"[server] tls_key: {key} does not match the certificate {cert}" in line
    assert watched.listener.options is first

    key.write_bytes(second.key_pem)
    assert watched.checks(3) == [
        "reload (files changed): the licensing listener's certificate and key are reloaded"
    ]
    assert watched.listener.options.certificate == second.certificate


def test_new_trust_roots_and_client_certificate_are_taken_when_their_files_change(tmp_path, pki):
    now = datetime.now(timezone.utc)
    volume = SecretVolume(tmp_path / "upstream")
    volume.update(_files(pki.pairs["client"], pki.pairs["ca"]))
    config = Config(
        tls=False, ca_file=volume.path("ca.crt"),
        client_cert=volume.path("tls.crt"), client_key=volume.path("tls.key"),
    )
    watched = Watched(config)
    creator = watched.creator()

    volume.update({"ca.crt": b"", "tls.crt": b"", "tls.key": b""})  # a Secret emptied by mistake
    (line,) = watched.checks(3)
    assert "keeping the license server's trust roots" in line
    assert "client certificate: [license] ca_file: no PEM certificate" in line
    assert watched.creator() is creator
    assert watched.reloaded == []

    new_ca = make_ca("rotated CA", now=now)
    client = issue(pki.pairs["client_ca"], ["rotated-client"], now=now, client=True)
    volume.update(_files(client, new_ca))
    assert watched.checks(3) == [
        "reload (files changed): the license server's trust roots and client certificate"
        " are reloaded"
    ]
    assert watched.creator() is not creator
    assert watched.reloaded == ["certificates reloaded (files changed)"]  # servers tried again
    tls = TLSMemoryBIOFactory(watched.creator(), True, Factory.forProtocol(Protocol))
    connection = watched.creator().clientConnectionForTLS(tls.buildProtocol(None))
    assert connection.get_certificate().to_cryptography() == client.certificate


def test_a_sighup_reload_is_not_repeated_by_the_next_check(tmp_path, pki):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.pairs["server"].write(cert, key)
    watched = Watched(Config(tls_cert=str(cert), tls_key=str(key)))
    issue(pki.pairs["ca"], LOCAL, now=datetime.now(timezone.utc)).write(cert, key)
    with capturedLogs() as events:
        watched.reload()
    assert [formatEvent(e) for e in events] == [
        "reload (SIGHUP): the licensing listener's certificate and key are reloaded",
        "reload (SIGHUP): the license server's trust roots and client certificate are reloaded",
    ]
    assert watched.checks(3) == []


_P256 = bytes.fromhex("06082a8648ce3d030107")  # the DER OID of the P-256 curve
_SM2 = bytes.fromhex("06082a811ccf5501822d")  # SM2's, as long; cryptography can't load it


def _on_an_unsupported_curve(pem: bytes) -> bytes:
    """The same PEM key or certificate with its P-256 curve renamed SM2."""
    lines = pem.splitlines()
    der = base64.b64decode(b"".join(lines[1:-1]))
    assert der.count(_P256) == 1
    return lines[0] + b"\n" + base64.encodebytes(der.replace(_P256, _SM2)) + lines[-1] + b"\n"


def test_keys_of_an_unsupported_kind_are_reported_and_checking_goes_on(tmp_path, pki):
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.pairs["server"].write(cert, key)
    watched = Watched(Config(tls_cert=str(cert), tls_key=str(key)))
    first = watched.listener.options
    second = issue(pki.pairs["ca"], LOCAL, now=datetime.now(timezone.utc))

    cert.write_bytes(second.cert_pem)
    key.write_bytes(_on_an_unsupported_curve(second.key_pem))
    (line,) = watched.checks(2)
    assert f"[server] tls_key: no usable unencrypted PEM private key in {key}" in line
    cert.write_bytes(_on_an_unsupported_curve(second.cert_pem))
    key.write_bytes(second.key_pem)
    (line,) = watched.checks(2)
    assert f"[server] tls_key: the certificate {cert} has an unsupported key" in line
    assert watched.listener.options is first

    cert.write_bytes(second.cert_pem)
    assert watched.checks() == [
        "reload (files changed): the licensing listener's certificate and key are reloaded"
    ]


def test_the_upstream_client_key_alone_is_watched(tmp_path, pki):
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    pki.pairs["client"].write(cert, key)
    watched = Watched(Config(tls=False, client_cert=str(cert), client_key=str(key)))
    creator = watched.creator()
    key.write_bytes(pki.pairs["server"].key_pem)  # only the key changes: another one
    (line,) = watched.checks()
    assert f"[license] client_key: {key} does not match the certificate {cert}" in line
    assert watched.creator() is creator


def _fifo(path):
    os.mkfifo(path)


def _dev_zero(path):
    os.symlink("/dev/zero", path)


def _too_large(path):
    path.write_bytes(b"#" * (1024 * 1024 + 1))


@pytest.mark.parametrize("make, reason", [
    (_fifo, "not a regular file"), (_dev_zero, "not a regular file"),
    (_too_large, "larger than 1048576 bytes"),
])
def test_a_certificate_that_is_no_regular_file_or_too_large_keeps_the_old_one(
    tmp_path, pki, make, reason
):
    """Issue 20 item 5: a FIFO blocked the read for ever, /dev/zero never ended it."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.pairs["server"].write(cert, key)
    watched = Watched(Config(tls_cert=str(cert), tls_key=str(key)))
    first = watched.listener.options
    cert.unlink()
    make(cert)
    (line,) = watched.checks(3)  # said once
    assert line == (
        "reload (files changed): keeping the licensing listener's certificate: [server] tls_cert:"
        f" cannot read {cert}: {reason}"
    )
    assert watched.listener.options is first
    cert.unlink()
    pki.pairs["server"].write(cert, key)
    assert watched.checks() == [
        "reload (files changed): the licensing listener's certificate and key are reloaded"
    ]


def test_the_files_are_read_and_the_material_built_by_run_and_put_in_service_after(tmp_path, pki):
    """``run`` is a thread in service: nothing is read on the event loop."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.pairs["server"].write(cert, key)
    config = Config(tls_cert=str(cert), tls_key=str(key))
    listener = ListenerTLS(listener_options(config, 0))
    first = listener.options
    queued = []

    def run(work):
        queued.append(work)
        return Deferred()

    reload = CertificateReload(
        Clock(), config, listener, upstream_tls(config), CertificateFiles.read(config),
        [].append, run,
    )
    issue(pki.pairs["ca"], LOCAL, now=datetime.now(timezone.utc)).write(cert, key)
    done = reload.check()
    (work,) = queued  # nothing read yet: only handed to run
    assert listener.options is first
    with capturedLogs() as events:
        done.callback(work())
    assert [formatEvent(e) for e in events] == [
        "reload (files changed): the licensing listener's certificate and key are reloaded"
    ]
    assert listener.options is not first


def test_the_peers_files_are_reloaded_like_the_others(tmp_path, pki):
    """[peers] ca_file, cert_file and key_file: the peers' client, and the listener (which asks
    for peers' certificates against that CA)."""
    ca, cert, key = (tmp_path / name for name in ("peers-ca.pem", "peer.crt", "peer.key"))
    ca.write_bytes(pki.pairs["ca"].cert_pem)
    cert.write_bytes(pki.pairs["peer"].cert_pem)
    key.write_bytes(pki.pairs["peer"].key_pem)
    config = Config(
        tls_cert=pki.server_cert, tls_key=pki.server_key, peer_urls=("https://localhost/",),
        peer_ca_file=str(ca), peer_cert_file=str(cert), peer_key_file=str(key),
    )
    listener = ListenerTLS(listener_options(config, 0))
    peers = peer_tls(config)
    clock = Clock()
    reload = CertificateReload(
        clock, config, listener, upstream_tls(config), CertificateFiles.read(config),
        lambda cause: None, peers=peers,
    )
    watching(reload, clock).startService()
    old_options, old_creator = listener.options, peers.creatorForNetloc(b"localhost", 443)

    cert.write_text("garbage")
    with capturedLogs() as events:
        clock.advance(CHECK_INTERVAL)
    lines = [formatEvent(e) for e in events]
    assert any("keeping the peers' CA and certificate: [peers] cert_file" in l for l in lines), lines
    assert peers.creatorForNetloc(b"localhost", 443) is old_creator

    renewed = issue(pki.pairs["ca"], ["license-proxy-peer"], now=datetime.now(timezone.utc), client=True)
    key.write_bytes(renewed.key_pem)
    cert.write_bytes(renewed.cert_pem)
    with capturedLogs() as events:
        clock.advance(CHECK_INTERVAL)
    lines = [formatEvent(e) for e in events]
    assert any("the peers' CA, certificate and key are reloaded" in l for l in lines), lines
    assert peers.creatorForNetloc(b"localhost", 443) is not old_creator
    assert listener.options is not old_options
