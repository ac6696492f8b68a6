"""Stopping the real servers tests start, whatever state they are in."""

from __future__ import annotations

import subprocess


def stop(process: subprocess.Popen, timeout: float = 10) -> bool:
    """SIGTERM, then SIGKILL if it has not ended within ``timeout``; True when it
    ended by itself."""
    if process.poll() is not None:
        return True
    process.terminate()
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
