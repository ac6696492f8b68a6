"""
Files replaced or extended durably: what the trust cache (and the demo's pid
file) needs so that a crash or a full disk leaves a file whole, old or new.

A replacement is written and fsynced under a temporary name, renamed over the
old file, and the directory fsynced (the rename is durable only then); an
append is fsynced before it counts.  The system calls go through ``Disk`` so
that tests can record their order or fail one of them.  Temporary files are
named after the writing process, so that those a killed process left can be
told from a live writer's and removed at the next start.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from attrs import define


_TEMPORARY = ".tmp-"
"""A write goes to ``path + _TEMPORARY + pid`` first."""

CHUNK = 1 << 16
"""Bytes handed to one ``write(2)``: pieces are gathered, not written one call each."""


@define
class Disk:
    """
    The system calls a durable write is made of, as one object, so that tests can record
    their order or fail one of them; the proxy uses these, the real ones.
    """

    def create(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def open_append(self, path: str) -> int:
        """An existing file, to append to (a missing journal is a failure: see ``append``)."""
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, source: str, target: str) -> None:
        os.replace(source, target)

    def fsync_dir(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(path)


def _write_all(disk: Disk, fd: int, pieces: Iterable[bytes]) -> int:
    """Write ``pieces`` in chunks of about ``CHUNK`` bytes; returns the bytes written."""
    total = 0
    batch: list[bytes] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= CHUNK:
            disk.write(fd, b"".join(batch))
            total += size
            batch, size = [], 0
    if batch:
        disk.write(fd, b"".join(batch))
        total += size
    return total


def write_atomically(path: str, data: Iterable[bytes], disk: Disk = Disk()) -> int:
    """
    Replace ``path`` with ``data`` (pieces) so that a crash leaves old or new, whole: the
    new file is written and fsynced under a temporary name, renamed over the old one, and
    the directory fsynced (the rename itself is durable only then).  Returns its size.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{_TEMPORARY}{os.getpid()}"
    try:
        size = _write_synced(disk, disk.create(tmp), data)
        disk.rename(tmp, path)
    except BaseException:
        try:
            disk.unlink(tmp)
        except OSError:
            pass
        raise
    disk.fsync_dir(directory)
    return size


def append(path: str, data: Iterable[bytes], disk: Disk = Disk()) -> int:
    """
    Add ``data`` at the end of ``path`` and fsync it; returns the bytes written.  A
    failure may leave part of it (a line cut short): the next write compacts.
    """
    return _write_synced(disk, disk.open_append(path), data)


def _write_synced(disk: Disk, fd: int, data: Iterable[bytes]) -> int:
    """Write ``data`` to ``fd``, fsync and close it; returns the bytes written."""
    try:
        size = _write_all(disk, fd, data)
        disk.fsync(fd)
    finally:
        disk.close(fd)
    return size


def remove_leftovers(path: str) -> list[str]:
    """
    Delete the temporary files that processes killed inside a write left
    next to ``path`` (named after their process id, so one per crash would
    pile up for ever); those of a process still running are its own business.
    Returns the names removed.
    """
    removed = []
    prefix = os.path.basename(path) + _TEMPORARY
    directory = os.path.dirname(os.path.abspath(path))
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = _pid(name[len(prefix):]) if name.startswith(prefix) else None
        if pid is None:
            continue
        if pid != os.getpid() and _running(pid):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            continue
        removed.append(name)
    return removed


PID_MAX = 1 << 22
"""Linux's largest process id (``/proc/sys/kernel/pid_max`` can't be set higher)."""


def _pid(text: str) -> Optional[int]:
    """The process id a temporary file is named after, or None if it can't be one
    (``str.isdigit`` accepts "²", and ``os.kill`` overflows on a long number)."""
    if not (text.isascii() and text.isdigit()):
        return None
    pid = int(text)
    return pid if 0 < pid <= PID_MAX else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
