"""
Headers that belong to one connection (RFC 9110 7.6.1): never relayed, either way, whether
or not the message's ``Connection`` names them.  Apart from the relay because the config
refuses them as cache key headers: a header never sent upstream can't tell licensees apart.
"""

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
