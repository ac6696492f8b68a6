"""
A loopback port whose connections hang in SYN, as behind a firewall that
drops packets.

Linux drops a SYN to a listening socket whose accept queue is full (it
neither answers nor refuses), so a socket listening with a backlog of 0 and
one connection never accepted is a black hole: every later connect waits for
its own timeout.  Nothing but loopback is involved.
"""

from __future__ import annotations

import socket


class BlackHole:
    """Listen on ``host:port`` (0: any free port) and swallow every later SYN."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.host, self.port = self.listener.getsockname()
        # Fills the accept queue; never accepted.
        self.filler = socket.create_connection((self.host, self.port), timeout=5)
        self._check()

    def _check(self) -> None:
        """A connection to it must hang: fail loudly otherwise (a kernel that answers)."""
        try:
            socket.create_connection((self.host, self.port), timeout=0.3).close()
        except socket.timeout:
            return
        except OSError as e:
            raise RuntimeError(f"{self.host}:{self.port} is not a black hole: {e}") from None
        raise RuntimeError(f"{self.host}:{self.port} is not a black hole: it accepted")

    def close(self) -> None:
        self.filler.close()
        self.listener.close()

    def __enter__(self) -> "BlackHole":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

