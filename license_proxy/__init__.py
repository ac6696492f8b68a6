"""
license-proxy: a drop-in replacement for a speech vendor's self-hosted License
Proxy.  It relays licensing check-ins to the license server and, when that
server can't be reached, keeps the fleet licensed from a trust cache for a
configured window.

Flow of a request: ``relay`` (licensing listener) -> ``upstream`` (verified
TLS to the license server) -> ``trustcache`` (store good answers, serve them
on failure) -> ``status`` (the state probes read).  ``checkin`` keeps the
state true without client traffic; ``service`` wires it all for ``tap``, the
twistd plugin's entry point.
"""
