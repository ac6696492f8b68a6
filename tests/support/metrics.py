"""A real proxy's status listener read as Prometheus and a probe read it: pages and scraped samples."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(proxy, path) -> tuple[int, bytes]:
    try:
        with _direct.open(f"http://{proxy.host}:{proxy.status_port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(proxy) -> dict:
    code, body = get(proxy, "/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
