"""A verifying TLS client of the test upstream, as strict as Python 3.13+ is by default."""

from __future__ import annotations

import http.client
import ssl

from tests.support.client import exchange
from tests.support.upstream import Upstream


def client_context(cafile=None, *, cert=None, key=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13+ does by default
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def connection(up: Upstream, context, host="localhost", timeout=5) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(host, up.port, context=context, timeout=timeout)


def get(up: Upstream, path="/", *, context, host="localhost", method="GET", body=None, headers=None):
    return exchange(connection(up, context, host), method, path, body, headers)
