"""The tests' plain HTTP client: one request on a fresh connection."""

from __future__ import annotations

import http.client


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    """Send one request on ``conn`` and close it: (response, body)."""
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()
