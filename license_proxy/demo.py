"""
A local stand-in for the vendor's license server, so anyone can try the proxy without an account.

``license-proxy-demo-upstream [--dir .demo] [--port 9443]`` makes (once) a CA, a certificate for
localhost and a complete proxy config in DIR, then answers every request on
``https://localhost:PORT`` with a small licensing-looking JSON document.  Stopping it (``kill
$(cat DIR/upstream.pid)``) and starting it again is how a user watches the proxy go Connected ->
TrustBased -> Failed and back: the generated config has a short trust window for that reason.

It is a demo, not a license server: it checks nothing and listens on loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from datetime import datetime, timedelta, timezone

import attrs
from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.ssl import CertificateOptions, PrivateCertificate, TLSVersion
from twisted.internet.task import react
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource

from .tls import certs
from .guards import QuietSite
from .status import rfc3339
from .durable import write_atomically

__all__ = ["DemoFiles", "prepare", "serve", "main"]

DEFAULT_DIR = ".demo"
DEFAULT_PORT = 9443
HOST = "127.0.0.1"
#: Names in the server certificate: the config uses "localhost", curl users may type the IP.
SERVER_NAMES = ("localhost", "127.0.0.1")
#: Reissue the server certificate this long before it expires, so an old demo directory keeps
#: working instead of failing with a TLS error nobody expects from a demo.
_RENEW_BEFORE = timedelta(days=1)

# Named explicitly: run as "python -m license_proxy.demo" the module is called __main__.
log = Logger(namespace="license_proxy.demo")


@attrs.frozen
class DemoFiles:
    """Absolute paths of everything the demo keeps in its directory."""

    directory: str
    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    config: str
    cache: str
    pid_file: str

    @classmethod
    def in_directory(cls, directory: str) -> DemoFiles:
        # Absolute, so the config works whatever directory twistd is started from.
        d = os.path.abspath(directory)
        return cls(
            directory=d,
            ca_cert=os.path.join(d, "ca.crt"),
            ca_key=os.path.join(d, "ca.key"),
            server_cert=os.path.join(d, "upstream.crt"),
            server_key=os.path.join(d, "upstream.key"),
            config=os.path.join(d, "license-proxy.toml"),
            cache=os.path.join(d, "state", "trust-cache.json"),
            pid_file=os.path.join(d, "upstream.pid"),
        )


def prepare(directory: str, port: int, now: datetime) -> DemoFiles:
    """
    Create what is missing in ``directory``: the CA, the server certificate, the proxy config.
    Existing files are kept, so the proxy's trust in the CA and any edits to the config survive
    restarts; delete the directory to start over.
    """
    files = DemoFiles.in_directory(directory)
    os.makedirs(files.directory, exist_ok=True)
    if _exists(files.ca_cert, files.ca_key):
        ca = certs.KeyPair(_read(files.ca_cert), _read(files.ca_key))
        renew = not _exists(files.server_cert, files.server_key) or _expiring(
            files.server_cert, now
        )
    else:
        log.info("creating the demo CA {path}", path=files.ca_cert)
        ca = certs.make_ca("license-proxy demo CA", now=now)
        ca.write(files.ca_cert, files.ca_key)
        renew = True  # a server certificate from an earlier CA would no longer verify
    if renew:
        log.info("issuing the demo server certificate {path}", path=files.server_cert)
        certs.issue(ca, SERVER_NAMES, now=now).write(files.server_cert, files.server_key)
    url = server_url(port)
    if not os.path.exists(files.config):
        log.info("writing the proxy config {path}", path=files.config)
        write_atomically(files.config, [config_text(files, port).encode("utf-8")])
    elif _configured_url(files.config) != url:
        log.warn(
            "{path} does not point at {url}; the proxy will not reach this demo server "
            "(delete the file to have it written again)",
            path=files.config,
            url=url,
        )
    return files


DEMO_KEY = "demo-key"


def server_url(port: int) -> str:
    return f"https://localhost:{port}"


def config_text(files: DemoFiles, port: int) -> str:
    """The proxy config for the demo: the vendor's keys plus ours, every choice explained."""
    return f"""\
# license-proxy configuration for the local demo, written by license-proxy-demo-upstream.
# It points the proxy at the demo license server in this directory; delete the directory to
# start over with new certificates and a fresh config.
#
#   twistd --nodaemon --pidfile= license-proxy --config {files.config}

[server]
# Loopback only: the demo is not meant to be reached from other machines.
host = "127.0.0.1"
# Licensing listener, HTTPS with a self-signed certificate made on first start:
#   curl -sk https://127.0.0.1:8443/v1/anything
port = 8443
# Status endpoint: curl -s http://127.0.0.1:8080/v1/status
status_port = 8080

[license]
# The demo license server (license-proxy-demo-upstream), instead of the vendor's.
server_url = {_toml_string(server_url(port))}
# Its certificate is signed by the demo CA, which only this config trusts.
ca_file = {_toml_string(files.ca_cert)}
# The demo license server takes any key.  A real deployment leaves this out and passes the key
# in DEEPGRAM_API_KEY; with no key at all the proxy refuses to start.
key = "{DEMO_KEY}"

[trust]
# Short on purpose, so the states change within minutes: once the demo server is stopped the
# proxy answers from its cache (TrustBased) for 2 minutes, then turns Failed.
# Production default: "24h".
duration = "2m"
# Check in every 5 s, so stopping or restarting the demo server shows in the state within
# seconds even without client traffic.  Production default: "60s".
checkin_interval = "5s"

[cache]
# The trust cache; the proxy's generated listener certificate is kept next to it.
path = {_toml_string(files.cache)}
"""


class _License(Resource):
    """Every method, every path: 200 and a small JSON answer that looks like a license."""

    isLeaf = True

    def __init__(self, clock) -> None:
        super().__init__()
        self._clock = clock

    def render(self, request) -> bytes:
        # The path only: query strings and headers (Authorization) may carry secrets.
        path = request.path.decode("ascii", "replace")
        log.info("{method} {path}", method=request.method.decode("ascii", "replace"), path=path)
        answer = {"license": "valid", "issued_at": rfc3339(self._clock.seconds()), "path": path}
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer, separators=(",", ":")).encode("utf-8") + b"\n"


async def serve(reactor, files: DemoFiles, port: int) -> None:
    """Serve HTTPS on 127.0.0.1:``port`` until the reactor stops (SIGTERM, Ctrl-C)."""
    other = _running_pid(files.pid_file)
    if other is not None:
        log.error(
            "a demo server for {directory} is already running (pid {pid}); stop it with "
            "kill {pid}, or delete {pid_file} if that process is not it",
            directory=files.directory,
            pid=other,
            pid_file=files.pid_file,
        )
        raise SystemExit(1)
    pair = PrivateCertificate.loadPEM(_read(files.server_cert) + _read(files.server_key))
    tls = CertificateOptions(
        privateKey=pair.privateKey.original,
        certificate=pair.original,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )
    endpoint = SSL4ServerEndpoint(reactor, port, tls, interface=HOST)
    try:
        listening = await endpoint.listen(QuietSite(_License(reactor)))
    except CannotListenError as e:
        log.error(
            "cannot listen on {host}:{port}: {reason}", host=HOST, port=port, reason=e.socketError
        )
        raise SystemExit(1)
    # react() runs this before reactor.run(), which installs the SIGTERM handler: wait for it,
    # so a pid file (written only once listening and running, removed on the way out) always
    # names a live server that a kill stops cleanly.
    await _running(reactor)
    write_atomically(files.pid_file, [f"{os.getpid()}\n".encode("ascii")])
    reactor.addSystemEventTrigger("before", "shutdown", _stop, listening, files.pid_file)
    log.info(
        "demo license server on {url} (CA {ca}); proxy config {config}; "
        "stop it with: kill $(cat {pid_file})",
        url=server_url(port),
        ca=files.ca_cert,
        config=files.config,
        pid_file=files.pid_file,
    )
    await Deferred()  # never fires: react() ends the process when the reactor stops


def _running(reactor) -> Deferred:
    """Fires once the reactor runs, after its signal handlers are in place."""
    running: Deferred = Deferred()
    reactor.callWhenRunning(running.callback, None)
    return running


def _stop(listening, pid_file: str) -> Deferred:
    _remove_own_pid_file(pid_file)
    log.info("demo license server stopped")
    return listening.stopListening()


def main(argv: list[str] | None = None) -> None:
    """Console script; the one place that takes the global reactor (through ``react``)."""
    parser = argparse.ArgumentParser(
        prog="license-proxy-demo-upstream",
        description="A local demo license server for trying license-proxy without an account.",
    )
    parser.add_argument(
        "--dir",
        default=DEFAULT_DIR,
        help="where the CA, certificates, proxy config and pid file live (default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="HTTPS port on 127.0.0.1 (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    react(_main, (args.dir, args.port))


async def _main(reactor, directory: str, port: int) -> None:
    now = datetime.fromtimestamp(reactor.seconds(), timezone.utc)
    try:
        files = prepare(directory, port, now)
    except OSError as e:
        log.error("cannot prepare {directory}: {error}", directory=directory, error=str(e))
        raise SystemExit(1)
    await serve(reactor, files, port)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def _toml_string(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


def _exists(*paths: str) -> bool:
    return all(os.path.exists(p) for p in paths)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _expiring(cert_path: str, now: datetime) -> bool:
    cert = x509.load_pem_x509_certificate(_read(cert_path))
    return cert.not_valid_after_utc < now + _RENEW_BEFORE


def _configured_url(config_path: str) -> object:
    try:
        with open(config_path, "rb") as f:
            return tomllib.load(f).get("license", {}).get("server_url")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return None


def _running_pid(pid_file: str) -> int | None:
    """The pid in ``pid_file`` if that process is alive; None for a missing or stale file."""
    try:
        pid = int(_read(pid_file).decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return pid


def _remove_own_pid_file(pid_file: str) -> None:
    """Remove the pid file unless another server has since taken it over."""
    try:
        if int(_read(pid_file).decode("ascii").strip()) == os.getpid():
            os.remove(pid_file)
    except (OSError, ValueError, UnicodeDecodeError):
        pass


if __name__ == "__main__":
    main()
