"""
Defaults the configuration shares with the modules that use them.  A leaf (it imports
nothing): reading a config, as ``license-proxy check`` and ``license-proxy-status`` do,
loads no Twisted.
"""

ANSWER_WITHIN = 2.0
"""Seconds a request with a trusted answer waits for the license server
(``[license] answer_within``); also the connect timeout."""

RETRY_INTERVAL = 5.0
"""Seconds between probes of a server that is down (``[license] retry_interval``)."""

DEFAULT_MAX_ENTRIES = 10_000
"""Answers kept at most: about 0.75 kB of memory each for a 300-byte answer, 3 kB for a
2 kB one, 0.25 kB for one equal to an answer stored lately (``bin/measure-cache-entry``),
so ~29 MiB at most for 2 kB answers."""

#: Request headers that identify a licensee; part of the cache key ([cache] key_headers).
CREDENTIAL_HEADERS = (b"authorization", b"cookie", b"x-api-key")
