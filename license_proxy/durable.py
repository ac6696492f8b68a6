"""
Files replaced or extended durably: what the trust cache (and the demo's pid
file) needs so that a crash or a full disk leaves a file whole, old or new.

A replacement is written and fsynced under a temporary name, renamed over the
old file, and the directory fsynced (the rename is durable only then); an
append is fsynced before it counts.  The system calls go through ``Disk`` so
that tests can record their order or fail one of them.  Temporary files are
named after the writing process, so that those a killed process left can be
told from a live writer's and removed at the next start.

Files are named relative to their directory, held open (``Directory``), and no
call follows a symbolic link: in a directory someone else can rename or write,
the proxy writes neither to their files nor through their links.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Iterable, Optional

from attrs import define, field


_TEMPORARY = ".tmp-"
"""A write goes to ``path + _TEMPORARY + pid`` first."""

CHUNK = 1 << 16
"""Bytes handed to one ``write(2)``: pieces are gathered, not written one call each."""


@define
class Disk:
    """
    The system calls a durable write is made of, as one object, so that tests can record
    their order or fail one of them; the proxy uses these, the real ones.  Files are named
    relative to a directory held open (``dir_fd``, see ``Directory``), and no call follows
    a symbolic link: whoever swaps the directory's path, or plants a link named as a file
    of ours, is not written through.
    """

    def open_dir(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def create(self, dir_fd: int, name: str) -> int:
        """A new file (``O_EXCL``: never one that is there, a link least of all)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, 0o600, dir_fd=dir_fd)

    def open_append(self, dir_fd: int, name: str) -> int:
        """An existing file, to append to (a missing journal is a failure: see ``append``)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, dir_fd=dir_fd)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, dir_fd: int, source: str, target: str) -> None:
        os.replace(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def fsync_dir(self, dir_fd: int) -> None:
        os.fsync(dir_fd)

    def unlink(self, dir_fd: int, name: str) -> None:
        os.unlink(name, dir_fd=dir_fd)


@define
class Directory:
    """
    A directory held open from its first write: the files in it are created, renamed and
    appended to relative to it.  It is the directory first opened (the one the cache was
    read from, at the start), and before each write its path must still name it: one
    renamed away and replaced by another (by someone who can write the directory above)
    fails the write, rather than write to theirs, or to ours where no start will look.
    """

    path: str
    disk: Disk = field(factory=Disk)
    #: Must it be this user's own, writable by no one else (the state directory)?
    private: bool = False
    _fd: Optional[int] = field(default=None, init=False)
    # The directory first opened (device, inode): the one every later write must go to.
    _identity: Optional[tuple[int, int]] = field(default=None, init=False)

    def fd(self) -> int:
        """The directory's descriptor, opened at the first call (or after ``release``)."""
        if self._fd is None:
            fd = self.disk.open_dir(self.path)
            found = os.fstat(fd)
            if self._identity not in (None, (found.st_dev, found.st_ino)):
                os.close(fd)
                raise self._replaced()
            self._fd, self._identity = fd, (found.st_dev, found.st_ino)
        return self._fd

    def checked(self) -> int:
        """``fd()``, once its path is seen to still name it (see the class)."""
        fd = self.fd()
        try:
            named = os.stat(self.path)  # through a link, as it was opened (systemd's DynamicUser)
        except FileNotFoundError:
            raise self._replaced() from None
        if (named.st_dev, named.st_ino) != self._identity:
            raise self._replaced()
        if self.private and (
            named.st_uid != os.geteuid() or named.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            raise OSError(
                errno.EPERM,
                f"{self.path} is not this user's own directory, or others can write it",
            )
        return fd

    def _replaced(self) -> OSError:
        return OSError(
            errno.ESTALE,
            f"{self.path} is no longer the directory opened at start (renamed or replaced)",
        )

    def release(self) -> None:
        """Close the descriptor until the next write, which must find the same directory."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.release()


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
    """``replace`` the file at ``path``, in its directory opened for this write alone."""
    directory = Directory(os.path.dirname(os.path.abspath(path)), disk)
    try:
        return replace(directory, os.path.basename(path), data)
    finally:
        directory.release()


def replace(directory: Directory, name: str, data: Iterable[bytes]) -> int:
    """
    Replace ``name`` with ``data`` (pieces) so that a crash leaves old or new, whole: the
    new file is written and fsynced under a temporary name, renamed over the old one, and
    the directory fsynced (the rename itself is durable only then).  Returns its size.
    """
    disk, fd = directory.disk, directory.checked()
    tmp = f"{name}{_TEMPORARY}{os.getpid()}"
    try:
        size = _write_synced(disk, disk.create(fd, tmp), data)
        disk.rename(fd, tmp, name)
    except BaseException:
        try:
            disk.unlink(fd, tmp)
        except OSError:
            pass
        raise
    disk.fsync_dir(fd)
    return size


def append(directory: Directory, name: str, data: Iterable[bytes]) -> int:
    """
    Add ``data`` at the end of ``name`` and fsync it; returns the bytes written.  A
    failure may leave part of it (a line cut short): the next write compacts.
    """
    disk = directory.disk
    return _write_synced(disk, disk.open_append(directory.checked(), name), data)


def _write_synced(disk: Disk, fd: int, data: Iterable[bytes]) -> int:
    """Write ``data`` to ``fd``, fsync and close it; returns the bytes written."""
    try:
        size = _write_all(disk, fd, data)
        disk.fsync(fd)
    finally:
        disk.close(fd)
    return size


def remove_leftovers(directory: Directory, name: str) -> list[str]:
    """
    Delete the temporary files that processes killed inside a write left
    next to ``name`` (named after their process id, so one per crash would
    pile up for ever); those of a process still running are its own business.
    Returns the names removed.
    """
    removed = []
    prefix = name + _TEMPORARY
    try:
        fd = directory.fd()
        names = os.listdir(fd)
    except OSError:
        return removed
    for found in names:
        pid = _pid(found[len(prefix):]) if found.startswith(prefix) else None
        if pid is None:
            continue
        if pid != os.getpid() and _running(pid):
            continue
        try:
            os.unlink(found, dir_fd=fd)
        except OSError:
            continue
        removed.append(found)
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
