"""
The TLS policy of both sides of the proxy: TLS 1.2 or newer, and in TLS 1.2
only forward-secret AEAD suites (Mozilla's "intermediate" list, ECDHE only:
DHE needs Diffie-Hellman parameters, which the listener has none of, and no
client we serve lacks ECDHE).  TLS 1.3 suites are OpenSSL's defaults, all
forward secret and AEAD.

The containers' clients (Go's crypto/tls, Rust's rustls, curl with OpenSSL)
all offer ECDHE with AES-GCM, so nothing they need is refused.
"""

from __future__ import annotations

from twisted.internet.ssl import AcceptableCiphers, TLSVersion

MINIMUM_VERSION = TLSVersion.TLSv1_2

ACCEPTABLE = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
