"""
The demo license server's pid file (license_proxy.demo), on a memory reactor: it is what the
quickstart and tests/integration/test_demo.py kill the server by, so it must appear only once
a SIGTERM would stop the server cleanly.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from license_proxy import demo


def test_the_pid_file_appears_once_the_reactor_runs_not_when_listening_begins(tmp_path):
    """react() runs serve() before reactor.run(), which is where the SIGTERM handler goes in:
    a pid file written earlier let a kill end the process by the signal's default (-15)."""
    reactor = MemoryReactorClock()
    files = demo.prepare(str(tmp_path / "demo"), 9443, datetime.now(timezone.utc))
    serving = Deferred.fromCoroutine(demo.serve(reactor, files, 9443))
    assert [(port, interface) for port, _, _, _, interface in reactor.sslServers] == [(9443, "127.0.0.1")]
    assert not os.path.exists(files.pid_file)
    reactor.run()
    assert int(Path(files.pid_file).read_text()) == os.getpid()
    assert not serving.called  # serving until the reactor stops
