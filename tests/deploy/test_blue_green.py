"""
Blue-green upgrade behind a real HAProxy (etc/haproxy.cfg, on free ports) with bin/blue-green:
two real twistd license-proxy processes, a client checking in continuously through HAProxy
the whole time, and not one failed check-in; with --copy-state, the new instance answers from
trust what only the old one relayed.
"""

from __future__ import annotations

import http.client
import importlib.machinery
import importlib.util
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from license_proxy.trustcache import TrustCache
from tests.support.installed import REPO_ROOT
from tests.support.proxy import ProxyProcess, free_port
from tests.support.cachefiles import T0, entry_at, journal_of, two_journaled
from tests.support.processes import stop

SCRIPT = REPO_ROOT / "bin" / "blue-green"


def proxy_config(tmp_path, pki, upstream_url, port, status_port, startup="10s"):
    return f"""
[server]
host = "127.0.0.1"
port = {port}
status_port = {status_port}
[license]
server_url = "{upstream_url}"
ca_file = "{pki.ca_cert}"
timeout = "5s"
startup_timeout = "{startup}"
[trust]
checkin_interval = "2s"
[cache]
path = "{tmp_path}/state/trust-cache.json"
"""


class HAProxy:
    """etc/haproxy.cfg with its ports and socket moved to free ones, run in the foreground."""

    def __init__(self, tmp_path, blue: ProxyProcess, green: ProxyProcess):
        if shutil.which("haproxy") is None:
            pytest.fail("haproxy is not installed (.ci/run installs the Debian package)")
        self.port = free_port()
        self.socket = tmp_path / "haproxy.sock"
        text = (REPO_ROOT / "etc" / "haproxy.cfg").read_text()
        for shipped, ours in [
            ("/run/haproxy/license-proxy.sock", str(self.socket)),
            ("bind :8443", f"bind 127.0.0.1:{self.port}"),
            ("127.0.0.1:9443 check port 9080", f"127.0.0.1:{blue.port} check port {blue.status_port}"),
            ("127.0.0.1:9444 check port 9081", f"127.0.0.1:{green.port} check port {green.status_port}"),
        ]:
            assert shipped in text, shipped
            text = text.replace(shipped, ours)
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(text)
        self.log = open(tmp_path / "haproxy.log", "wb")
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 10
            while not (self.socket.exists() and self.server_status("blue").startswith("UP")):
                assert self.process.poll() is None, (tmp_path / "haproxy.log").read_text()
                assert time.monotonic() < deadline, "HAProxy: no stats socket, or blue not UP"
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def server_status(self, name: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", "import sys, importlib.machinery as m;"
             "g = m.SourceFileLoader('bg', sys.argv[1]).load_module();"
             "print(g.HAProxy(sys.argv[2]).server('license_proxy', sys.argv[3])['status'])",
             str(SCRIPT), str(self.socket), name],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()

    def stop(self):
        stop(self.process)
        self.log.close()


class CheckInClient(threading.Thread):
    """Checks in through HAProxy on a fresh TLS connection every 20 ms, as containers do."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.stopping = threading.Event()
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE  # the instances' self-signed certificates

    def run(self):
        deadline = time.monotonic() + 120  # bounded, whatever the test does
        while not self.stopping.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10, context=self.context)
            try:
                conn.request("POST", "/v1/check-in", body=b'{"n":1}')
                response = conn.getresponse()
                body = response.read()
                if response.status == 200 and body == b'{"license":"valid"}':
                    self.ok += 1
                else:
                    self.failures.append(f"{response.status} {body[:100]!r}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
            finally:
                conn.close()
            time.sleep(0.02)

    def wait_for(self, count: int, timeout: float = 20):
        target = self.ok + count
        deadline = time.monotonic() + timeout
        while self.ok < target:
            assert time.monotonic() < deadline, f"only {self.ok} check-ins; failures {self.failures[:5]}"
            time.sleep(0.05)

    def finish(self):
        self.stopping.set()
        self.join(20)


def relays(proxy: ProxyProcess) -> int:
    return proxy.log_text().count("relay POST /v1/check-in")


def command(socket_path, status_port, *extra):
    return [sys.executable, str(SCRIPT), "--socket", str(socket_path), "--backend",
            "license_proxy", "--old", "blue", "--new", "green",
            "--status-url", f"http://127.0.0.1:{status_port}/v1/status", *extra]


def blue_green(haproxy, green, *extra, timeout=60):
    return subprocess.run(
        command(haproxy.socket, green.status_port, *extra),
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def blue(tmp_path, pki, upstream):
    upstream.respond(body=b'{"license":"valid"}')
    (tmp_path / "blue").mkdir()
    text = proxy_config(tmp_path / "blue", pki, upstream.url, free_port(), free_port())
    with ProxyProcess(tmp_path / "blue", text) as proxy:
        proxy.wait_state("Connected")
        yield proxy


def test_swap_blue_for_green_without_a_failed_check_in(tmp_path, pki, upstream, blue):
    (tmp_path / "green").mkdir()
    green = ProxyProcess(
        tmp_path / "green",
        proxy_config(tmp_path / "green", pki, upstream.url, free_port(), free_port()),
    )
    haproxy = HAProxy(tmp_path, blue, green)
    client = CheckInClient(haproxy.port)
    try:
        assert haproxy.server_status("green") == "MAINT"
        client.start()
        client.wait_for(20)
        green.start()
        result = blue_green(haproxy, green, "--stop", f"kill -TERM {blue.process.pid}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "new instance: Connected" in result.stdout
        assert blue.wait_exit(15) in (0, -15)
        during = relays(green)
        client.wait_for(50)
        client.finish()
        assert relays(green) > during  # check-ins after the swap went to green
        assert haproxy.server_status("blue") == "MAINT"
        assert haproxy.server_status("green").startswith("UP")
    finally:
        try:
            client.finish()
            if green.process is not None:
                green.terminate()
        finally:
            haproxy.stop()
    print(f"{client.ok} check-ins through HAProxy, {len(client.failures)} failed")
    assert client.failures == [], f"{len(client.failures)} failed of {client.ok + len(client.failures)}"
    assert client.ok > 70 and relays(blue) > 0
    assert "Traceback" not in blue.log_text() + green.log_text()


def test_green_that_cannot_reach_the_license_server_is_never_switched_to(tmp_path, pki, upstream, blue):
    (tmp_path / "green").mkdir()
    dead = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    green = ProxyProcess(
        tmp_path / "green",
        proxy_config(tmp_path / "green", pki, dead, free_port(), free_port(), startup="3s"),
    )
    haproxy = HAProxy(tmp_path, blue, green)
    client = CheckInClient(haproxy.port)
    try:
        client.start()
        client.wait_for(10)
        green.start()
        result = blue_green(haproxy, green, "--timeout", "8", "--stop", "false")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "not switching: license_proxy/blue keeps serving" in result.stdout
        assert green.wait_exit(10) == 1  # the start-up rule
        client.wait_for(10)
        assert haproxy.server_status("blue").startswith("UP")
        assert haproxy.server_status("green") == "MAINT"
        assert blue.running
    finally:
        try:
            client.finish()
        finally:
            haproxy.stop()
    assert client.failures == []


def answers_on_disk(state) -> int:
    return len(TrustCache.load(Clock(), str(state / "trust-cache.json")))


def test_green_started_from_a_copy_of_blues_state_answers_from_trust_what_only_blue_relayed(
    tmp_path, pki, upstream, blue
):
    x = {"Authorization": "Token credential-x"}
    answer = b'{"license":"valid","for":"x"}'
    upstream.respond(body=answer)
    assert blue.request("POST", "/v1/check-in", b'{"n":1}', x)[::2] == (200, answer)
    deadline = time.monotonic() + 15
    while answers_on_disk(tmp_path / "blue" / "state") < 1:  # written within FLUSH_DELAY
        assert time.monotonic() < deadline, "blue never wrote the answer to its trust cache"
        time.sleep(0.1)
    (tmp_path / "green").mkdir()
    green = ProxyProcess(
        tmp_path / "green",
        proxy_config(tmp_path / "green", pki, upstream.url, free_port(), free_port()),
    )
    haproxy = HAProxy(tmp_path, blue, green)
    try:
        swap = subprocess.Popen(
            command(haproxy.socket, green.status_port, "--stop", f"kill -TERM {blue.process.pid}",
                    "--copy-state", tmp_path / "blue" / "state", tmp_path / "green" / "state"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        first = swap.stdout.readline()  # --start's turn: the copy is done
        assert "blue-green: copied the trust cache of" in first, first + swap.communicate()[0]
        green.start()
        output = first + swap.communicate(timeout=60)[0]
        assert swap.returncode == 0, output
        assert blue.wait_exit(15) in (0, -15)
        upstream.stop()
        status, headers, body = green.request("POST", "/v1/check-in", b'{"n":1}', x)
        assert (status, body) == (200, answer), green.log_text()
        assert headers["Age"] is not None
        again = blue_green(haproxy, green, "--copy-state", tmp_path / "blue" / "state",
                           tmp_path / "green" / "state")
        assert again.returncode == 2 and again.stdout == ""
        assert again.stderr.count("\n") == 1 and "the new instance is running" in again.stderr
        assert green.running
    finally:
        try:
            if green.process is not None:
                green.terminate()
        finally:
            haproxy.stop()
    assert "Traceback" not in blue.log_text() + green.log_text()


def load_script():
    loader = importlib.machinery.SourceFileLoader("blue_green", str(SCRIPT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_the_copy_is_private_whatever_the_umask_and_follows_the_proxys_private_directory(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    two_journaled(old / "trust-cache.json", Clock())
    shared = tmp_path / "shared"  # an emptyDir: the proxy keeps its files in private/
    shared.mkdir()
    shared.chmod(0o777)
    umask = os.umask(0)
    try:
        copies = [load_script().copy_state(str(old), str(new)) for new in (tmp_path / "new", shared)]
    finally:
        os.umask(umask)
    assert copies == [str(tmp_path / "new"), str(shared / "private")]
    for directory in map(Path, copies):
        assert mode(directory) == 0o700
        assert sorted(os.listdir(directory)) == ["trust-cache.json", "trust-cache.json.journal"]
        for name in os.listdir(directory):
            assert mode(directory / name) == 0o600
            assert (directory / name).read_bytes() == (old / name).read_bytes()
        cache = TrustCache.load(Clock(), str(directory / "trust-cache.json"))
        assert [cache.lookup(k) for k in ("k0", "k1")] == [entry_at(T0), entry_at(T0 + 1)]
    assert load_script().copy_state(str(shared), str(tmp_path / "again")) == str(tmp_path / "again")


def test_a_copy_taken_across_a_compaction_loads_and_a_stale_journal_is_removed(tmp_path):
    """The old instance replaced its snapshot between the two reads: the journal copied
    names another generation, which loading ignores; the snapshot holds all of it."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    path = old / "trust-cache.json"
    cache = two_journaled(path, Clock())
    stale = journal_of(path).read_bytes()
    cache.store("k2", entry_at(T0 + 2))
    cache.close()  # a new snapshot, a new journal
    journal_of(path).write_bytes(stale)
    script = load_script()
    script.copy_state(str(old), str(new))
    copied = TrustCache.load(Clock(), str(new / "trust-cache.json"))
    assert [copied.lookup(k) for k in ("k0", "k1", "k2")] == [entry_at(T0 + i) for i in range(3)]
    journal_of(path).unlink()
    script.copy_state(str(old), str(new))
    assert sorted(os.listdir(new)) == ["trust-cache.json"]


def test_copy_state_from_a_directory_without_a_trust_cache_is_refused_in_one_line(tmp_path):
    (tmp_path / "old" / "private").mkdir(parents=True)
    result = subprocess.run(
        command(tmp_path / "haproxy.sock", free_port(),
                "--copy-state", tmp_path / "old", tmp_path / "new", "--start", "touch started"),
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"blue-green: --copy-state: no trust cache in {tmp_path}/old"
        f" (nor in {tmp_path}/old/private) to copy\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["old"]  # nothing started, nothing created


NOBODY = 65534
"""Another user: the tests run as root, and chown files to it to play the one who planted them."""


def planted(tmp_path) -> Path:
    """An old state directory as an emptyDir (0777) in which another user replaced ``private/``
    with their own, holding a forged snapshot (issue 20, item 1)."""
    old = tmp_path / "old"
    old.mkdir()
    old.chmod(0o777)
    private = old / "private"
    private.mkdir()
    two_journaled(private / "trust-cache.json", Clock())
    for path in (private, *private.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    return old


def test_copy_state_refuses_a_private_directory_another_user_planted_and_copies_nothing(tmp_path):
    old = planted(tmp_path)
    result = subprocess.run(
        command(tmp_path / "haproxy.sock", free_port(),
                "--copy-state", old, tmp_path / "new", "--start", "touch started"),
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        f"blue-green: --copy-state: {old}/private belongs to uid {NOBODY}, not to the instances'"
        " user (uid 0): another user may have put it there\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["old"]  # nothing started, nothing created


def _private_a_link(old: Path) -> None:
    mine = old.parent / "elsewhere"
    (old / "private").rename(mine)
    os.chown(mine, 0, 0)
    for path in mine.iterdir():
        os.chown(path, 0, 0)
    (old / "private").symlink_to(mine)


def _cache_a_link(old: Path) -> None:
    private = old / "private"
    os.chown(private, 0, 0)
    (private / "trust-cache.json").rename(old.parent / "forged.json")
    os.chown(old.parent / "forged.json", 0, 0)
    (private / "trust-cache.json").symlink_to(old.parent / "forged.json")
    os.chown(private / "trust-cache.json.journal", 0, 0)


def _journal_group_writable(old: Path) -> None:
    private = old / "private"
    for path in (private, *private.iterdir()):
        os.chown(path, 0, 0)
    (private / "trust-cache.json.journal").chmod(0o660)


def _top_level_someone_elses(old: Path) -> None:
    """No cache in private/: the file at the top, left there by whoever could write it."""
    private = old / "private"
    for name in ("trust-cache.json", "trust-cache.json.journal"):
        (private / name).rename(old / name)
    os.chown(private, 0, 0)


def _snapshot_a_fifo(old: Path) -> None:
    private = old / "private"
    for path in (private, *private.iterdir()):
        os.chown(path, 0, 0)
    (private / "trust-cache.json").unlink()
    os.mkfifo(private / "trust-cache.json", 0o600)


@pytest.mark.parametrize(
    "plant, reason",
    [
        (_private_a_link, "private is a symbolic link"),
        (_cache_a_link, "trust-cache.json is a symbolic link"),
        (_journal_group_writable, "trust-cache.json.journal is writable by other users"),
        (_top_level_someone_elses, f"old/trust-cache.json.journal belongs to uid {NOBODY}"),
        (_snapshot_a_fifo, "trust-cache.json is not a regular file"),
    ],
)
def test_copy_state_refuses_links_files_of_others_and_files_others_can_write(tmp_path, plant, reason):
    old = planted(tmp_path)
    plant(old)
    script = load_script()
    with pytest.raises(script.Refused, match=reason):
        script.copy_state(str(old), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_as_root_the_files_of_the_user_an_unshared_state_directory_belongs_to_are_copied(tmp_path):
    """systemd hands a StateDirectory= to the unit's user: root copies that user's cache."""
    old = tmp_path / "old"
    old.mkdir()
    two_journaled(old / "trust-cache.json", Clock())
    for path in (old, *old.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    assert load_script().copy_state(str(old), str(tmp_path / "new")) == str(tmp_path / "new")
    assert (tmp_path / "new" / "trust-cache.json").read_bytes() == (
        old / "trust-cache.json"
    ).read_bytes()
