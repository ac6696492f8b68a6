"""
Egress: how the proxy reaches the license server, directly or through a
corporate forward proxy.

Twisted and treq read no proxy variables, so the route is chosen here the way
curl chooses it: for an https:// upstream, ``https_proxy``, ``HTTPS_PROXY``,
``all_proxy``, ``ALL_PROXY`` (the first that is set and not empty), unless
``no_proxy``/``NO_PROXY`` names the host.  ``[license] proxy`` and ``no_proxy``
in the config win over the environment.  Choosing is a pure function of the
settings and the upstream's host and port; ``Egress`` turns the choice into
the endpoint the HTTP agent connects through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Optional

from attrs import field, frozen
from hyperlink import URL
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from .connect import FastEndpoint
from .proxyurl import Proxy, netloc
from .tls.contexts import UpstreamTLS
from .tunnel import ConnectTunnel, Socks5Tunnel, TunnelEndpoint, resolver

PROXY_VARIABLES = ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


@frozen
class Route:
    """Where a connection to an upstream goes: ``proxy`` None is direct;
    ``why`` says which setting decided, for the start-up log."""

    proxy: Optional[Proxy]
    why: str

    def __str__(self) -> str:
        if self.proxy is None:
            return f"direct ({self.why})"
        return f"through proxy {self.proxy} ({self.why})"


def choose(
    proxy: str, no_proxy: str, environ: Mapping[str, str], host: str, port: int
) -> Route:
    """
    The route to ``host:port`` (an https upstream).  ``proxy``/``no_proxy``
    are the config's values, which win over the environment's; empty means
    unset, as for the variables.  Raises ValueError, naming the variable, for
    a proxy variable that is not a usable proxy URL.
    """
    source = "[license] proxy" if proxy else _first_set(PROXY_VARIABLES, environ)
    if source is None:
        return Route(None, "no proxy configured")
    exclusions = "[license] no_proxy" if no_proxy else _first_set(NO_PROXY_VARIABLES, environ)
    if exclusions is not None and bypasses(no_proxy or environ[exclusions], host, port):
        return Route(None, f"{netloc(host, port)} matches {exclusions}")
    try:
        return Route(Proxy.parse(proxy or environ[source]), f"from {source}")
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _first_set(names: Sequence[str], environ: Mapping[str, str]) -> Optional[str]:
    return next((name for name in names if environ.get(name)), None)


def bypasses(no_proxy: str, host: str, port: int) -> bool:
    """
    Whether a ``NO_PROXY`` list sends ``host:port`` direct: comma-separated
    entries; ``*`` matches everything; a name matches itself and its
    subdomains (a leading dot is ignored); ``:port`` limits an entry to that
    port; an IP entry (IPv6 with or without brackets) or CIDR block matches
    IP-literal hosts inside it.
    """
    host = host.lower().rstrip(".")
    address = _ip(host)
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if entry == "*":
            return True
        pattern, entry_port = _split_port(entry)
        if not pattern or (entry_port is not None and entry_port != port):
            continue
        try:
            network = ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            name = pattern.lstrip(".").rstrip(".")
            if name and (host == name or host.endswith("." + name)):
                return True
        else:
            if address is not None and address in network:
                return True
    return False


def _split_port(entry: str) -> tuple[str, Optional[int]]:
    """An entry's host part and optional port: ``[::1]:443``, ``::1``, ``host:443``."""
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return inside, int(port) if port.isdigit() else None
    if entry.count(":") == 1:  # more colons: an IPv6 address without a port
        name, _, port = entry.partition(":")
        if port.isdigit():
            return name, int(port)
    return entry, None


def _ip(host: str):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@frozen
class Settings:
    """The config's ``proxy``/``no_proxy`` and the environment at start."""

    proxy: str = field(repr=False)
    no_proxy: str
    environ: Mapping[str, str] = field(repr=False)
    _chosen: dict = field(factory=dict, init=False, repr=False, eq=False)

    def route(self, host: str, port: int) -> Route:
        """Chosen once per host and port: the settings never change while running."""
        try:
            return self._chosen[host, port]
        except KeyError:
            route = self._chosen[host, port] = choose(
                self.proxy, self.no_proxy, self.environ, host, port
            )
            return route

    def routes(self, urls: Sequence[str]) -> list[tuple[str, Route]]:
        """The route to each upstream URL, for the start-up log; ValueError
        for a proxy variable that is not a proxy URL."""
        parsed = [(url, URL.from_text(url)) for url in urls]
        return [(url, self.route(u.host, u.port)) for url, u in parsed]


@implementer(IAgentEndpointFactory)
@frozen
class Egress:
    """
    The endpoints the HTTP agent connects through: TLS to the upstream
    (SNI and hostname verification on the upstream's name) over a direct TCP
    connection, or over a CONNECT or SOCKS5 tunnel through the chosen proxy.
    """

    _reactor: object  # IReactorTCP and IReactorTime
    _tls: UpstreamTLS  # its creatorForNetloc for the upstream, creatorForProxy for an https:// proxy
    _settings: Settings
    _connect_timeout: float = 30.0  # resolution and TCP connect, to the upstream or the proxy

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"only https:// license servers, not {uri.scheme!r}")
        host = uri.host.decode("ascii")
        route = self._settings.route(host, uri.port)
        upstream_tls = self._tls.creatorForNetloc(uri.host, uri.port)
        if route.proxy is None:
            to_upstream = FastEndpoint(self._reactor, host, uri.port, self._connect_timeout)
        else:
            to_upstream = self._tunnel(route.proxy, host, uri.port)
        return _Quiet(wrapClientTLS(upstream_tls, to_upstream))

    def _tunnel(self, proxy: Proxy, host: str, port: int) -> TunnelEndpoint:
        to_proxy = FastEndpoint(self._reactor, proxy.host, proxy.port, self._connect_timeout)
        if proxy.scheme == "https":
            to_proxy = wrapClientTLS(self._tls.creatorForProxy(proxy.host), to_proxy)
        to_proxy = _Quiet(to_proxy)
        if proxy.scheme in ("http", "https"):
            handshake = ConnectTunnel(host, port, proxy.basic_credentials())
        else:
            handshake = Socks5Tunnel(
                host,
                port,
                proxy.username,
                proxy.password,
                resolve=resolver(self._reactor) if proxy.scheme == "socks5" else None,
            )
        return TunnelEndpoint(to_proxy, proxy.name, handshake)


@implementer(IStreamClientEndpoint)
@frozen
class _Quiet:
    """Connects without the "Starting factory" / "Stopping factory" lines
    that factories log for every upstream (or forward proxy) connection."""

    _endpoint: IStreamClientEndpoint

    def connect(self, factory):
        factory.noisy = False
        return self._endpoint.connect(factory)
