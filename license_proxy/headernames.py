"""
What the relay knows of header names, shared with the config, which refuses as cache key
headers those the relay never sends as the client sent them: a header that does not reach
the license server as sent can't tell licensees apart.
"""

import re

#: A field name (RFC 9110 5.1: a token).
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

#: CGI, WSGI, Rack and PHP read ``X_Api_Key`` and ``X-Api-Key`` as one header (both become
#: ``HTTP_X_API_KEY``): a credential under the ``_`` spelling would reach the license server
#: without being in the cache key.  So a request with ``_`` in a header name is refused (400,
#: as nginx ignores such headers by default), and no cache key header may have one.
UNDERSCORE = b"_"

#: Headers that belong to one connection (RFC 9110 7.6.1): never relayed, either way,
#: whether or not the message's ``Connection`` names them.

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Marks a request from another instance (see ``peers``).
PEER = b"license-proxy-peer"

#: An instance's random id, in its requests to peers and its answers to them: which peer an
#: answer went to, and how one finding its peers by DNS knows its own address (``discovery``).
INSTANCE = b"license-proxy-instance"

#: The fingerprint of the key salt an instance keys its answers with, in a peer's pull of
#: entries (``peers``): an HMAC of a fixed text under the salt, never the salt.
SALT = b"license-proxy-salt"

#: Request headers the relay's client sets again for each request, and the peers' headers
#: (never sent to the license server).
REQUEST_OWN = frozenset({b"host", b"content-length", PEER, INSTANCE, SALT})
