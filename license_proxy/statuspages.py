"""
The status listener's pages: ``/`` (the page for people, see ``overview``), ``/v1/status``
(the state as JSON, see ``status``), ``/v1/ready`` (200 or 503, for readiness probes),
``/v1/health`` (for liveness probes) and ``/metrics``; nothing else, and never Twisted's
error pages.
"""

from __future__ import annotations

from typing import Optional

from twisted.web.resource import Resource

from .overview import CSP, Overview
from .status import Status


def _json(request, body: bytes) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body + b"\n"


class _StatusPage(Resource):
    def __init__(self, status: Status) -> None:
        super().__init__()
        self._status = status

    def render_GET(self, request) -> bytes:
        return _json(request, self._status.as_json())


class _ReadyPage(_StatusPage):
    """200 while containers are licensed (``Connected``, ``TrustBased``), else 503."""

    def render_GET(self, request) -> bytes:
        if not self._status.ready:
            request.setResponseCode(503)
        return super().render_GET(request)


class _HealthPage(Resource):
    """The process answers: for liveness probes, whatever the state."""

    def render_GET(self, request) -> bytes:
        return _json(request, b'{"alive":true}')


class _OverviewPage(Resource):
    """``/``: HTML, allowed nothing but its own style, never framed nor cached."""

    def __init__(self, overview: Overview) -> None:
        super().__init__()
        self._overview = overview

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", CSP.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-store")
        return self._overview.page()


class _Routes(Resource):
    """
    The status listener's only routes: these exact paths (any query), GET and
    HEAD.  Anything else gets 404 or 405 with a fixed body, never Twisted's
    error pages, which echo the request's target.
    """

    isLeaf = True

    def __init__(self, pages: dict[bytes, Resource]) -> None:
        super().__init__()
        self._pages = pages

    def render(self, request) -> bytes:
        page = self._pages.get(request.path)
        if page is None:
            request.setResponseCode(404)
            return _json(request, b'{"error":"not found"}')
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return _json(request, b'{"error":"method not allowed"}')
        return page.render(request)


def status_resource(
    status: Status, metrics: Resource, overview: Optional[Overview] = None
) -> Resource:
    """The status listener: ``/v1/status``, ``/v1/ready``, ``/v1/health``
    and ``/metrics``; ``/`` too given the ``overview``."""
    pages = {
        b"/v1/status": _StatusPage(status),
        b"/v1/ready": _ReadyPage(status),
        b"/v1/health": _HealthPage(),
        b"/metrics": metrics,
    }
    if overview is not None:
        pages[b"/"] = _OverviewPage(overview)
    return _Routes(pages)
