"""
Run a real ``twistd license-proxy`` process for end-to-end tests.

The process is started exactly as an operator would (``twistd --nodaemon license-proxy --config
FILE``, or the ``license-proxy`` command's ``serve FILE``), from the installed package of the
interpreter running the tests (``tests.support.installed``: it must be this checkout's).  The license key
is ``TEST_KEY`` in ``DEEPGRAM_API_KEY``, as the vendor's deployments pass it, unless the test says
otherwise: the proxy refuses to start without one.  Tests talk to it only over the network: the status
port (plain HTTP) and the licensing listener (HTTPS, or HTTP when the config disables TLS).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from tests.support.client import exchange
from tests.support.installed import script

TWISTD = script("twistd")
#: The installed ``license-proxy`` console script.
COMMAND = (script("license-proxy"),)
TEST_KEY = "test-key-0123456789"

#: Proxy settings inherited from the developer's or CI's environment would send the proxy's
#: upstream traffic elsewhere; tests that want them pass them in ``env`` explicitly.
_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")

# urllib must not go through an environment proxy to reach 127.0.0.1 either.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _connect_host(host: str) -> str:
    """Where to connect to reach a listener bound to ``host`` (wildcards mean loopback)."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class ProxyProcess:
    """
    One ``twistd license-proxy`` process, configured by ``config_text`` (TOML).

    ``scheme`` ("https", or "http" when the config sets ``[server] tls = false``) and
    ``ca_file`` (None: do not verify the proxy's certificate, which it self-signs by default)
    decide how ``request()`` talks to the licensing listener; tests may also set them as
    attributes.  ``options`` are added to the plugin's command line; ``wrapper`` is a command
    twistd runs under (strace), whose child gets the signals.  ``env`` is added to
    the test's environment (a value of None removes a variable); proxy variables of the
    test's own environment are not inherited, DEEPGRAM_API_KEY is ``TEST_KEY`` and
    LICENSE_PROXY_DRAIN_TIME is ``0s`` (a ``drain_time`` in the file wins over it).  ``cli``,
    when given, runs ``license-proxy *cli FILE`` (e.g. ``("-v", "serve")``) instead of twistd.
    ``umask`` is the process's (default: the test's).
    """

    def __init__(
        self,
        tmp_path,
        config_text: str,
        env: dict[str, str | None] | None = None,
        *,
        scheme: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        options: tuple[str, ...] = (),
        umask: int | None = None,
        wrapper: tuple[str, ...] = (),
        cli: tuple[str, ...] | None = None,
    ) -> None:
        self.tmp_path = Path(tmp_path)
        self.config_text = config_text
        self.config_path = self.tmp_path / "license-proxy.toml"
        self.log_path = self.tmp_path / "proxy.log"
        self.env = dict(env or {})
        self.options = tuple(options)
        self.umask = -1 if umask is None else umask  # Popen's "leave it as it is"
        self.wrapper = tuple(wrapper)
        self.cli = cli
        try:
            server = tomllib.loads(config_text).get("server", {})
        except tomllib.TOMLDecodeError:
            server = {}  # a test of the proxy's own config errors; defaults for the rest
        self.host = _connect_host(server.get("host", "0.0.0.0"))
        self.port: int = server.get("port", 8443)
        self.status_port: int = server.get("status_port", 8080)
        if scheme is None:
            scheme = "http" if server.get("tls") is False else "https"
        self.scheme = scheme
        self.ca_file = ca_file
        self.raw_status: str | None = None
        self.process: subprocess.Popen | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "ProxyProcess":
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("already running")
        self.config_path.write_text(self.config_text)
        env = {k: v for k, v in os.environ.items() if k.upper() not in _PROXY_VARIABLES}
        env["PYTHONUNBUFFERED"] = "1"
        env["DEEPGRAM_API_KEY"] = TEST_KEY
        env.pop("PYTHONPATH", None)  # the installed package runs, not a checkout on the path
        # Most tests stop their proxy with nothing in front of it: no drain, or every stop
        # would take 5 s; tests of the stop and the fleet days set it back (None: the default).
        env["LICENSE_PROXY_DRAIN_TIME"] = "0s"
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        if self.cli is None:
            command = [TWISTD, "--nodaemon", "--pidfile=", "license-proxy", "--config", str(self.config_path), *self.options]
        else:
            command = [*COMMAND, *self.cli, str(self.config_path)]
        self._command = command
        args = [*self.wrapper, *command]
        with open(self.log_path, "ab", buffering=0) as log:
            self.process = subprocess.Popen(
                args, cwd=self.tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                umask=self.umask,
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_exit(self, timeout: float = 30) -> int:
        """The exit status (negative: killed by that signal) once the process has ended."""
        assert self.process is not None, "not started"
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"license-proxy still running after {timeout}s\n{self._log_tail()}"
            ) from None

    def terminate(self, timeout: float = 10) -> int:
        """SIGTERM and wait (SIGKILL if it does not end in ``timeout``); the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int:
        return self._signal(signal.SIGKILL, 10)

    @property
    def pid(self) -> int:
        """
        The proxy's process id.  Under a wrapper, the process that runs the proxy's
        command line itself (its script run by an interpreter): the wrapper's child
        when the wrapper forks (strace), the wrapper's own process once it has
        exec'd the command (unshare, sh -c 'exec ...').
        """
        assert self.process is not None, "not started"
        if not self.wrapper:
            return self.process.pid
        deadline = time.monotonic() + 10
        while True:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            for pid in [self.process.pid, *map(int, children.read_text().split())]:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
                except FileNotFoundError:
                    continue
                if self._command in (cmdline, cmdline[1:]):
                    return pid
            assert time.monotonic() < deadline, f"{self.wrapper[0]} started no proxy process"
            time.sleep(0.01)

    def _signal(self, signum: int, timeout: float) -> int:
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            os.kill(self.pid, signum)  # a wrapper (strace) ends with it, with its status
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
        return self.process.wait()

    def __enter__(self) -> "ProxyProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        if self.process is not None:
            self.terminate()

    # -- observing -----------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def status(self, timeout: float = 5) -> dict:
        """GET /v1/status on the status port, parsed; the text is kept in ``raw_status``."""
        url = f"http://{_url_host(self.host)}:{self.status_port}/v1/status"
        try:
            with _direct.open(url, timeout=timeout) as response:
                self.raw_status = response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            self.raw_status = e.read().decode("utf-8", "replace")
            raise
        return json.loads(self.raw_status)

    def wait_state(self, state: str | tuple[str, ...], timeout: float = 15) -> dict:
        """
        Poll the status every 50 ms until its "state" is ``state`` (or one of them); the
        status.  Fails at once if the process exits.
        """
        wanted = (state,) if isinstance(state, str) else tuple(state)
        return self.wait_status(lambda s: s.get("state") in wanted, f"state {wanted}", timeout)

    def wait_status(self, accept: Callable[[dict], bool], wanted: str, timeout: float = 15) -> dict:
        """Poll the status every 50 ms until ``accept(status)``, described as ``wanted``."""
        deadline = time.monotonic() + timeout
        last: object = "no answer yet"
        while True:
            if not self.running:
                code = None if self.process is None else self.process.returncode
                raise AssertionError(
                    f"license-proxy exited ({code}) while waiting for {wanted}; "
                    f"last status: {last}\n{self._log_tail()}"
                )
            try:
                current = self.status(timeout=1)
                last = self.raw_status
                if accept(current):
                    return current
            except (OSError, ValueError, http.client.HTTPException) as e:
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"license-proxy not in {wanted} after {timeout}s; "
                    f"last status: {last}\n{self._log_tail()}"
                )
            time.sleep(0.05)

    # -- the licensing listener ----------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10,
        client_cert: tuple[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request to the licensing listener on a fresh connection: (status, headers, body);
        ``client_cert``: (certificate, key) files presented over TLS."""
        if self.scheme == "https":
            if self.ca_file is None:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            else:
                context = ssl.create_default_context(cafile=str(self.ca_file))
            if client_cert is not None:
                context.load_cert_chain(*client_cert)
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=context
            )
        elif self.scheme == "http":
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        else:
            raise ValueError(f"unknown scheme {self.scheme!r}")
        response, answer = exchange(conn, method, path, body, headers)
        return response.status, response.headers, answer


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
