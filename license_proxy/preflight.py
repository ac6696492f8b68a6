"""
What a start refuses, found before anything listens or is created: the configuration, the
license key, FIPS mode, the state directory, the certificate, key and CA files, the egress
route.  ``license-proxy check`` runs exactly this, and ``twistd license-proxy`` runs it
before it builds the service, so the two cannot say different things of one file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import attrs

from . import config as configuration
from . import fips, statedir
from .egress import Settings
from .tls import contexts as tls


@attrs.frozen
class Checked:
    """A configuration that passed, and the egress it chose."""

    config: configuration.Config
    egress: Settings
    routes: list


def run(path: Optional[str], environ: Mapping[str, str], now: float) -> Checked:
    """Raise ``ConfigError`` (one line) for the first thing a start would refuse."""
    config = configuration.load(path, environ)
    configuration.require_key(path, config)
    fips.require(path, config, fips.in_fips_mode(), fips.openssl_version())
    statedir.check(config)
    if config.tls_cert:
        tls.listener_options(config, now)
    tls.upstream_tls(config)
    tls.peer_tls(config)
    egress = Settings(config.proxy, config.no_proxy, dict(environ))
    try:
        routes = egress.routes(config.server_urls)
    except ValueError as e:  # HTTPS_PROXY and the like: not the file's
        raise configuration.ConfigError(f"environment variable {e}") from None
    return Checked(config, egress, routes)
