"""The tests' PKI: a CA, server certificates good and bad, a client CA; also for bench/ scripts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs

from license_proxy.tls.certs import KeyPair, issue, make_ca


@attrs.frozen
class Pki:
    """
    A test PKI written to ``directory``; every ``*_cert``/``*_key`` is a file path (str).

    - ``ca``: the CA the tests trust; ``server``: its certificate for localhost and 127.0.0.1.
    - ``wrong_host``: same CA, issued for "wrong.example" only.
    - ``unknown_ca_server``: for localhost and 127.0.0.1, signed by ``unknown_ca``, which
      nobody trusts.
    - ``expired``: same CA, localhost and 127.0.0.1, expired yesterday.
    - ``client_ca`` and ``client``: for mutual TLS; the client certificate's CN is ``client_cn``.
    - ``peer``: a client certificate from ``ca``, as instances present to their peers
      (``[peers] cert_file``) when ``ca`` is also ``[peers] ca_file``.

    ``pairs`` holds the same certificates in memory, by those names.
    """

    directory: Path
    pairs: dict[str, KeyPair]
    client_cn: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    wrong_host_cert: str
    wrong_host_key: str
    unknown_ca_cert: str
    unknown_ca_key: str
    unknown_ca_server_cert: str
    unknown_ca_server_key: str
    expired_cert: str
    expired_key: str
    client_ca_cert: str
    client_ca_key: str
    client_cert: str
    client_key: str
    peer_cert: str
    peer_key: str


LOCAL = ["localhost", "127.0.0.1"]


def make_pki(directory: Path) -> Pki:
    """The test PKI, written to ``directory`` (also for scripts outside pytest)."""
    now = datetime.now(timezone.utc)
    ca = make_ca("license-proxy test CA", now=now)
    unknown_ca = make_ca("unknown CA", now=now)
    client_ca = make_ca("license-proxy test client CA", now=now)
    client_cn = "license-proxy-test-client"
    pairs = {
        "ca": ca,
        "server": issue(ca, LOCAL, now=now),
        "wrong_host": issue(ca, ["wrong.example"], now=now),
        "unknown_ca": unknown_ca,
        "unknown_ca_server": issue(unknown_ca, LOCAL, now=now),
        "expired": issue(
            ca, LOCAL, now=now, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        ),
        "client_ca": client_ca,
        "client": issue(client_ca, [client_cn], now=now, client=True),
        "peer": issue(ca, ["license-proxy-peer"], now=now, client=True),
    }
    paths = {}
    for name, pair in pairs.items():
        paths[f"{name}_cert"] = str(directory / f"{name}.crt")
        paths[f"{name}_key"] = str(directory / f"{name}.key")
        pair.write(paths[f"{name}_cert"], paths[f"{name}_key"])
    return Pki(directory=directory, pairs=pairs, client_cn=client_cn, **paths)
