"""
Real forward proxies on loopback, for end-to-end egress tests: squid (HTTP
``CONNECT``, optionally with Basic auth, optionally listening on TLS) and
dante (SOCKS5, optionally with user name/password).  Each writes its own
access log, which the tests read to prove traffic went through it.

A missing binary fails the test loudly: ``bash .ci/run`` installs both.
squid drops to its ``proxy`` user and dante authenticates against system
accounts, so both need root (CI's ``.ci/run`` runs as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.proxy import free_port
from tests.support.processes import stop

#: A system account for dante's user name/password method (it checks system passwords).
SOCKS_USER = "lpsockstest"
SOCKS_PASSWORD = "socks-pass-9413"


def _binary(name: str, package: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(
            f"{name} is not installed: these tests need a real {package} "
            f"(bash .ci/run installs it: apt-get install {package})"
        )
    return path


def _need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"this test must run as root: {why} (CI's bash .ci/run does)")


def ensure_socks_user() -> None:
    """Create the SOCKS test account if it is missing, and (re)set its password."""
    _need_root("dante checks user names and passwords against system accounts")
    try:
        pwd.getpwnam(SOCKS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", SOCKS_USER],
            check=True,
        )
    subprocess.run(
        ["chpasswd"], input=f"{SOCKS_USER}:{SOCKS_PASSWORD}\n", text=True, check=True
    )


class _Daemon:
    """A proxy process in a private directory, with its log; a context manager."""

    binary: str
    package: str
    log_name: str

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"license-proxy-{self.package}-"))
        self.dir.chmod(0o755)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self):
        binary = _binary(self.binary, self.package)
        output = open(self.dir / "output.txt", "ab")
        self.process = subprocess.Popen(
            [binary, *self.command()], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=output, stderr=output,
        )
        output.close()
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.binary} exited ({self.process.returncode})\n{self._diagnostics()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.binary} not listening after 10 s\n{self._diagnostics()}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / self.log_name).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10) -> str:
        """The access log once it contains ``text``."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the {self.binary} log after {timeout} s\n{self._diagnostics()}")
            time.sleep(0.05)
        return self.log()

    def _diagnostics(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")) + [self.dir / "output.txt"]:
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


class Squid(_Daemon):
    """
    squid as an HTTP forward proxy on 127.0.0.1.  ``users`` ({name: password})
    turns on Basic proxy auth; ``tls`` (certificate and key paths) makes it an
    https:// proxy.  squid logs a CONNECT in ``access.log`` when the tunnel
    closes.
    """

    binary, package, log_name = "squid", "squid-openssl", "access.log"

    def __init__(self, users: dict[str, str] | None = None, tls: tuple[str, str] | None = None):
        super().__init__()
        _need_root("squid starts as root and drops to its proxy user")
        self.users = users
        self.tls = tls
        self.scheme = "https" if tls else "http"

    def url(self, user: str | None = None, password: str | None = None, host="127.0.0.1") -> str:
        credentials = f"{user}:{password}@" if user else ""
        return f"{self.scheme}://{credentials}{host}:{self.port}"

    def command(self) -> list[str]:
        d = self.dir
        lines = [
            f"pid_filename {d}/squid.pid",
            f"access_log stdio:{d}/access.log",
            f"cache_log {d}/cache.log",
            f"coredump_dir {d}",
            "cache deny all",
            "cache_mem 8 MB",
            "shutdown_lifetime 0 seconds",
        ]
        if self.tls:
            shutil.copy(self.tls[0], d / "tls.crt")
            shutil.copy(self.tls[1], d / "tls.key")
            lines.append(f"https_port 127.0.0.1:{self.port} tls-cert={d}/tls.crt tls-key={d}/tls.key")
        else:
            lines.append(f"http_port 127.0.0.1:{self.port}")
        if self.users:
            (d / "passwd").write_text(
                "".join(f"{name}:{_crypt(password)}\n" for name, password in self.users.items())
            )
            lines += [
                f"auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd",
                "auth_param basic realm corp",
                "acl authenticated proxy_auth REQUIRED",
                "http_access allow authenticated",
            ]
        else:
            lines.append("http_access allow localhost")
        lines.append("http_access deny all")
        (d / "squid.conf").write_text("\n".join(lines) + "\n")
        proxy_user = pwd.getpwnam("proxy")
        for path in [d, *d.iterdir()]:
            os.chown(path, proxy_user.pw_uid, proxy_user.pw_gid)
        return ["-N", "-f", str(d / "squid.conf")]


def _crypt(password: str) -> str:
    """A SHA-512 crypt(3) hash, which squid's basic_ncsa_auth checks with crypt()."""
    return subprocess.run(
        ["openssl", "passwd", "-6", password], capture_output=True, text=True, check=True
    ).stdout.strip()


class Dante(_Daemon):
    """
    dante as a SOCKS5 server on 127.0.0.1; ``auth`` requires the system
    account ``SOCKS_USER``'s user name and password.  dante logs each session
    as it starts, in ``danted.log``.
    """

    binary, package, log_name = "danted", "dante-server", "danted.log"

    def __init__(self, auth: bool = False):
        super().__init__()
        self.auth = auth
        if auth:
            ensure_socks_user()

    def url(self, scheme: str = "socks5h", user: str | None = None, password: str | None = None) -> str:
        credentials = f"{user}:{password}@" if user else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        method = "username" if self.auth else "none"
        (self.dir / "danted.conf").write_text(
            f"""
logoutput: {self.dir}/danted.log
internal: 127.0.0.1 port = {self.port}
external: 127.0.0.1
socksmethod: {method}
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: connect disconnect error
}}
socks pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    command: connect
    log: connect disconnect error
}}
"""
        )
        return ["-f", str(self.dir / "danted.conf"), "-N", "1"]
