"""
A forward proxy's URL, parsed: the config checks ``[license] proxy`` with it, and ``egress``
routes through it.  No network code here, so reading a config never imports any.
"""

from __future__ import annotations

from base64 import b64encode
from typing import Optional
from urllib.parse import unquote, urlsplit

from attrs import field, frozen

_DEFAULT_PORTS = {"http": 1080, "https": 443, "socks5": 1080, "socks5h": 1080}  # curl's


def netloc(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@frozen
class Proxy:
    """A forward proxy from a URL such as ``http://user:pass@proxy:3128``.
    The password never appears in ``str()`` or ``repr()``."""

    scheme: str  # http, https, socks5 or socks5h
    host: str  # IPv6 without brackets
    port: int
    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)

    @classmethod
    def parse(cls, text: str) -> Proxy:
        """Parse a proxy URL (no scheme means http://, as in curl); user name
        and password are percent-decoded.  ValueError never repeats the text,
        which may hold a password."""
        if "://" not in text:
            text = "http://" + text
        try:
            url = urlsplit(text)
            port = url.port
        except ValueError:
            raise ValueError("expected a proxy URL such as http://proxy:3128") from None
        scheme = url.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(
                f"expected a proxy URL with scheme http, https, socks5 or socks5h, got {scheme!r}"
            )
        if not url.hostname:
            raise ValueError("expected a proxy URL with a host, such as http://proxy:3128")
        username = None if url.username is None else unquote(url.username)
        password = None if url.password is None else unquote(url.password)
        if scheme.startswith("socks5") and any(
            len(s.encode()) > 255 for s in (username or "", password or "")
        ):
            raise ValueError("SOCKS5 user names and passwords are at most 255 bytes")
        return cls(scheme, url.hostname, port or _DEFAULT_PORTS[scheme], username, password)

    @property
    def address(self) -> str:
        """``host:port``, IPv6 in brackets."""
        return netloc(self.host, self.port)

    def __str__(self) -> str:
        """The URL for logs: the user name kept, the password masked."""
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password is not None else "") + "@"
        return f"{self.scheme}://{user}{self.address}"

    @property
    def name(self) -> str:
        """The proxy in failure reasons: no credentials at all."""
        return f"{self.scheme}://{self.address}"

    def basic_credentials(self) -> Optional[bytes]:
        """The ``Proxy-Authorization`` value, when the URL has a user name."""
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode("utf-8")
        return b"Basic " + b64encode(pair)
