"""
Reading the certificate, key and CA files the config names: regular files only (after
following symlinks, so a Secret volume's ``..data`` flip still works), of at most
``MAX_SIZE`` bytes.  A FIFO blocks a read for ever and ``/dev/zero`` never ends one: as
``tls_cert``, either stopped the relay and the status port (the watcher read on the event
loop).  Standard library only: the config checks these files at load.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_SIZE = 1024 * 1024
"""Bytes.  A certificate chain or a key is a few kilobytes, a CA bundle a few hundred
(the whole Mozilla bundle: about 220 kB)."""


def read(path: str) -> bytes:
    """``path``'s contents; OSError, its ``strerror`` saying why, if it is no regular file
    of at most ``MAX_SIZE`` bytes.  Opened without blocking: a FIFO is refused, not waited on."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(MAX_SIZE + 1)
    if len(data) > MAX_SIZE:
        raise OSError(errno.EFBIG, f"larger than {MAX_SIZE} bytes")
    return data
