"""
End to end, peers found by one DNS name as on Kubernetes (a headless Service): real ``twistd
license-proxy`` processes, each on its own loopback address with the same ports, configured as
the vendor's chart allows (the config file has no [peers]: the name, the CA, the peer
certificate and its key come from environment variables, PEM in the variable), each with the
generated listener certificate (the chart configures none). The name resolves through a hosts
file in a private mount namespace (``tests/support/hosts.py``). Each instance finds the others
and not itself; an instance added to the name is a peer without a restart, and serves an
answer only it holds during an outage.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from license_proxy.tls.certs import issue
from tests.support.configs import config
from tests.support.hosts import needs_unshare, private_hosts, rewrite
from tests.support.metrics import scrape
from tests.support.proxy import ProxyProcess, free_port

NAME = "peers.license-proxy.test"
GOOD = b'{"license":"ok"}'


def instances(tmp_path, pki, upstream, addresses):
    """An instance on each address, sharing the ports, the peer settings in its environment."""
    pair = issue(pki.pairs["ca"], [NAME], now=datetime.now(timezone.utc), peer=True)
    env = {
        "LICENSE_PROXY_PEERS_NAME": NAME,
        "LICENSE_PROXY_PEERS_CA": pki.pairs["ca"].cert_pem.decode(),
        "LICENSE_PROXY_PEERS_CERT": pair.cert_pem.decode(),
        "LICENSE_PROXY_PEERS_KEY": pair.key_pem.decode(),
    }
    hosts = tmp_path / "hosts"
    port, status_port = free_port(), free_port()
    proxies = {}
    for address in addresses:
        directory = tmp_path / address
        directory.mkdir()
        text = config(directory, pki, upstream.url)
        text = text.replace('host = "127.0.0.1"', f'host = "{address}"', 1)
        text = _ports(text, port, status_port)
        proxies[address] = ProxyProcess(directory, text, env=env, wrapper=private_hosts(hosts))
    return hosts, proxies


def _ports(text: str, port: int, status_port: int) -> str:
    lines = []
    for line in text.splitlines():
        if line.startswith("port = "):
            line = f"port = {port}"
        elif line.startswith("status_port = "):
            line = f"status_port = {status_port}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def names(addresses) -> str:
    return "127.0.0.1 localhost\n" + "".join(f"{a} {NAME}\n" for a in addresses)


def wait_peers(proxy: ProxyProcess, expected: list[str], timeout: float = 40.0) -> None:
    """Until the instance's last word on its peers names exactly ``expected`` (addresses)."""
    urls = ", ".join(f"https://{a}:{proxy.port}/" for a in expected)
    line = f"names {len(expected)} peer(s) now: {urls}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [x for x in proxy.log_text().splitlines() if f"peers: {NAME} names" in x]
        if found and found[-1].endswith(line):
            return
        time.sleep(0.2)
    raise AssertionError(f"{line!r} not logged:\n{proxy.log_text()[-3000:]}")


def ask(proxy: ProxyProcess, token: str):
    code, headers, body = proxy.request(
        "GET", "/v1/lic", headers={"Authorization": token}, timeout=60
    )
    return code, body


def served_by_peer(proxy: ProxyProcess) -> float:
    return scrape(proxy).get(("license_proxy_relays_total", (("outcome", "served_by_peer"),)), 0)


@needs_unshare
def test_instances_named_by_dns_find_each_other_not_themselves_and_new_ones(
    tmp_path, pki, upstream
):
    a, b, c = "127.0.0.2", "127.0.0.3", "127.0.0.4"
    hosts, proxies = instances(tmp_path, pki, upstream, [a, b, c])
    rewrite(hosts, names([a, b]))
    with proxies[a], proxies[b]:
        for address in (a, b):
            proxies[address].wait_state("Connected")
        wait_peers(proxies[a], [b])
        wait_peers(proxies[b], [a])
        # A third instance, added to the name: a peer of both without a restart.
        with proxies[c]:
            proxies[c].wait_state("Connected")
            rewrite(hosts, names([a, b, c]))
            wait_peers(proxies[a], [b, c])
            wait_peers(proxies[c], [a, b])
            upstream.respond(body=GOOD)
            assert ask(proxies[c], "Token carol") == (200, GOOD)  # through c only
            # c pushes it to a and b (issue 19 item 3): a holds it before the outage.
            from_c = f"https://{c}:{proxies[a].port}/"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                seen = {p["url"]: p for p in proxies[a].status()["peers"]}
                if seen[from_c]["received"] == 1:
                    break
                time.sleep(0.1)
            assert sorted(seen) == [f"https://{x}:{proxies[a].port}/" for x in (b, c)]
            assert seen[from_c]["received"] == 1
            upstream.stop()
            proxies[c].kill()
            assert ask(proxies[a], "Token carol") == (200, GOOD), proxies[a].log_text()[-3000:]
            assert served_by_peer(proxies[a]) == 0
            # The name's addresses were asked, never the instance's own.
            assert not [
                x for x in proxies[a].log_text().splitlines()
                if "names" in x and f"https://{a}:" in x
            ]
