"""
The twistd entry point (``twistd license-proxy --config PATH``): parses the
command line, loads the config, and builds the service.  This is the Twisted
boundary, so it is the one place that takes the global reactor.  ``--config ""``
runs on the built-in defaults, as the vendor's program does without a file.
"""

from __future__ import annotations

import os
import sys
import time

import attrs
from twisted.application.service import MultiService
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    textFileLogObserver,
)
from twisted.python import usage

from . import config as configuration
from . import fips, preflight, runtime
from .logformat import FORMATS, JSON, json_observer
from .service import make_service

DEFAULT_CONFIG = "/etc/license-proxy/license-proxy.toml"
LOG_LEVELS = ("error", "warn", "info", "debug")

log = Logger()


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "Path of the TOML configuration file."],
        ["log-format", None, None, "text or json (one object per line); overrides [log] format."],
        ["log-level", None, "info", "error, warn, info or debug: the least severe events logged."],
    ]

    def postOptions(self) -> None:
        given = self["log-format"]
        if given is not None and given not in FORMATS:
            raise usage.UsageError(f"--log-format: expected text or json, got {given!r}")
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {self['log-level']!r}"
            )
        self.path = self["config"] or None
        try:
            # What ``license-proxy check`` runs: the two agree.
            self.checked = preflight.run(self.path, os.environ, time.time())
        except configuration.ConfigError as e:
            _config_exit(e)
        self.loaded = self.checked.config
        if given is not None:
            self.loaded = attrs.evolve(self.loaded, log_format=given)


def _config_exit(error: Exception) -> None:
    """A bad config is one line and status 2, never a traceback."""
    sys.stderr.write(f"license-proxy: {error}\n")
    sys.stderr.flush()
    raise SystemExit(2)


def makeService(options: Options):
    from twisted.internet import reactor

    config = options.loaded
    # Process-wide, before anything is scheduled or opened.
    runtime.monotonic_timers(reactor)
    # Each listener connection is a file, and a licensing one may hold an upstream one.
    runtime.raise_open_files_limit(3 * config.max_connections)
    egress, routes = options.checked.egress, options.checked.routes
    try:
        service = make_service(config, reactor, lambda line: _fatal(reactor, line), egress)
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
    for url, route in routes:
        log.info("egress to {url}: {route}", url=url, route=str(route))
    log.debug(
        "configuration from {source}: {config!r}",
        source=options.path or "the built-in defaults",
        config=config,
    )
    if config.fips:
        log.info("FIPS mode: {openssl} in FIPS mode", openssl=fips.openssl_version())
    if config.log_format == JSON:
        observer = json_observer()
    elif _to_stdout(options.parent):
        observer = textFileLogObserver(sys.stdout)
    else:
        return service  # twistd's --logfile or --syslog, every level
    level = LogLevel.levelWithName(options["log-level"])
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return _LoggingTo(FilteringLogObserver(observer, [predicate]), service)


def _to_stdout(twistd) -> bool:
    """Whether twistd logs text on standard output (``--nodaemon`` without ``--logfile``)."""
    if twistd is None:
        return True
    return bool(
        twistd.get("nodaemon")
        and twistd.get("logfile") in (None, "", "-")
        and not twistd.get("syslog")
    )


class _LoggingTo(MultiService):
    """
    Gives twistd the log observer: twistd takes an ``ILogObserver`` component
    of its application (what a ``.tac`` file sets), and the service a plugin
    makes becomes that application's child.  ``twistd --logger`` still wins.
    """

    def __init__(self, observer, service) -> None:
        super().__init__()
        self._observer = observer
        service.setServiceParent(self)

    def setServiceParent(self, parent) -> None:
        parent.setComponent(ILogObserver, self._observer)
        super().setServiceParent(parent)


def _fatal(reactor, line: str) -> None:
    """Stop with a non-zero status: twistd itself has no way to set one.  Before the
    reactor runs (a port found taken as twistd starts the services), as soon as it does."""
    log.critical("license-proxy cannot start: {line}", line=line)
    reactor.addSystemEventTrigger("after", "shutdown", _exit, 1)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def _exit(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
