"""The broken upstreams of issue 4, each a change made to a working ``tests.support.upstream.Upstream``."""

from __future__ import annotations


def _mode(mode):
    def misbehave(upstream, pki):
        upstream.mode = mode

    return misbehave


def _status(code):
    def misbehave(upstream, pki):
        upstream.respond(status=code, body=b'{"license":"bad"}')

    return misbehave


def _comes_back(mode="normal", cert=None):
    """The upstream goes down and comes back changed; the proxy's pooled
    connections are cut with it, so its next request opens a new one."""

    def misbehave(upstream, pki):
        upstream.stop()
        upstream.mode = mode
        if cert is not None:
            upstream.use_certificate(getattr(pki, f"{cert}_cert"), getattr(pki, f"{cert}_key"))
        upstream.start()

    return misbehave


FAULTS = {
    "refused": lambda upstream, pki: upstream.stop(),
    "black hole": _comes_back(mode="blackhole"),
    "hang": _mode("hang"),
    "reset before the headers": _mode("reset"),
    "reset during the headers": _mode("reset_in_headers"),
    "reset during the body": _mode("reset_in_body"),
    "body shorter than Content-Length": _mode("truncated"),
    "chunked body without its last chunk": _mode("chunked_truncated"),
    "body dripping past the deadline": _mode("drip"),
    **{f"status {code}": _status(code) for code in (500, 502, 503, 504)},
    "certificate expired": _comes_back(cert="expired"),
    "certificate for another host": _comes_back(cert="wrong_host"),
    "certificate from an unknown CA": _comes_back(cert="unknown_ca_server"),
}
