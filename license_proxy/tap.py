"""
The twistd entry point (``twistd license-proxy --config PATH``): parses the
command line, loads the config, and builds the service.  This is the Twisted
boundary, so it is the one place that takes the global reactor.
"""

from __future__ import annotations

import os
import sys

from OpenSSL import SSL
from twisted.logger import Logger
from twisted.python import usage

from . import config as configuration
from . import runtime
from .service import make_service

DEFAULT_CONFIG = "/etc/license-proxy/license-proxy.toml"

log = Logger()


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path of the TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self.loaded = configuration.load(self["config"], os.environ)
        except configuration.ConfigError as e:
            _config_exit(e)


def _config_exit(error: Exception) -> None:
    """A bad config is one line and status 2, never a traceback."""
    sys.stderr.write(f"license-proxy: {error}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def makeService(options: Options):
    from twisted.internet import reactor

    config = options.loaded
    try:
        service = make_service(config, reactor, lambda line: _fatal(reactor, line))
    except configuration.ConfigError as e:
        _config_exit(e)
    reactor.callWhenRunning(runtime.settle)
    scheme = "https" if config.tls else "http"
    log.info(
        "license-proxy: licensing on {scheme}://{host}:{port}{base}, status on "
        "http://{host}:{status_port}/v1/status; upstream {upstreams}; trust window "
        "{duration:g} s; trust cache {cache}",
        scheme=scheme,
        host=config.host,
        port=config.port,
        base=config.base_url,
        status_port=config.status_port,
        upstreams=", ".join(config.server_urls),
        duration=config.trust_duration,
        cache=config.cache_path,
    )
    if config.fips:
        log.warn(
            "[fips] mode = enabled is accepted for compatibility but changes nothing: "
            "TLS uses the system's {openssl}, not a FIPS-validated module",
            openssl=SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(),
        )
    return service


def _fatal(reactor, line: str) -> None:
    """Stop with a non-zero status: twistd itself has no way to set one."""
    log.critical("license-proxy cannot start: {line}", line=line)
    reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
    reactor.stop()


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
