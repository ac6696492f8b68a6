"""
The state directory ([cache] path's directory): the trust cache and the generated
listener key.  Whoever can write the directory can replace those files: a forged
trust cache is answers of their choosing, trusted until a date of their choosing.

So the proxy creates it 0700 (whatever the umask) and writes every file in it 0600.
A directory that already exists writable by its group or by everyone (a Kubernetes
emptyDir is 0777; ``fsGroup`` makes a volume group-writable) is not refused, since
those deployments are common and work: the files go to a subdirectory ``private``
that only this user can enter, checked to be this user's own at every start, and
files a former version kept at the top are moved into it, so nothing is lost.

That is checked at the start; while the proxy runs, the cache's directory is held
open and its files are created, renamed and appended to relative to it, never
through a link (``durable.Directory``): ``private`` renamed away and replaced by
someone else's fails the writes (said in the status), rather than writing to theirs.
"""

from __future__ import annotations

import os
import stat

import attrs
from twisted.logger import Logger

from .config import Config, ConfigError
from .tls.contexts import GENERATED_CERT, GENERATED_KEY
from .cachefile import JOURNAL

PRIVATE = "private"
"""The subdirectory used when the state directory is writable by others."""

log = Logger()


def prepare(config: Config) -> Config:
    """
    Make the state directory ready; ``config`` with ``cache_path`` where the files
    must go.  Raises ``ConfigError`` when it can't be used safely.
    """
    directory = config.state_dir
    try:
        mode = os.stat(directory).st_mode
    except FileNotFoundError:
        _create(directory)
        return config
    except OSError as e:
        raise _unusable(directory, e.strerror) from None
    if not stat.S_ISDIR(mode):
        raise _unusable(directory, "not a directory")
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return config
    private = os.path.join(directory, PRIVATE)
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise _unusable(private, e.strerror) from None
    _make_private(private)
    cache = os.path.basename(config.cache_path)
    for name in (cache, cache + JOURNAL, GENERATED_CERT, GENERATED_KEY):
        _move_in(os.path.join(directory, name), os.path.join(private, name))
    log.warn(
        "state directory {directory} is writable by other users (mode {mode:o}), who could"
        " replace files in it: the trust cache and the generated key are kept in {private}"
        " (0700) instead",
        directory=directory,
        mode=stat.S_IMODE(mode),
        private=private,
    )
    return attrs.evolve(config, cache_path=os.path.join(private, os.path.basename(config.cache_path)))


def _make_private(private: str) -> None:
    """``private`` checked to be this user's own directory, and made 0700 (fsGroup's kubelet
    adds g+rwx at every mount) on what was checked: opened without following a link."""
    try:
        fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # a link (ELOOP, ENOTDIR) or a file: not a directory of this user
        fd = None
    try:
        own = None if fd is None else os.fstat(fd)
        if own is None or own.st_uid != os.geteuid():
            raise _not_own(private)
        os.fchmod(fd, 0o700)
    finally:
        if fd is not None:
            os.close(fd)


def check(config: Config) -> None:
    """
    What ``prepare`` would refuse, found without creating, moving or changing anything:
    ``license-proxy check`` runs it, and so does a start, first, so that the two agree.
    """
    directory = config.state_dir
    existing = directory
    while True:
        try:
            mode = os.stat(existing).st_mode
            break
        except FileNotFoundError:
            existing = os.path.dirname(os.path.abspath(existing))  # created with its parents
        except OSError as e:
            raise _unusable(existing, e.strerror) from None
    if not stat.S_ISDIR(mode):
        raise _unusable(existing, "not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _unusable(existing, f"not writable by this user (uid {os.geteuid()})")
    private = os.path.join(directory, PRIVATE)
    if existing == directory and mode & (stat.S_IWGRP | stat.S_IWOTH) and os.path.lexists(private):
        _require_own(private)


def _require_own(private: str) -> None:
    own = os.lstat(private)
    if not stat.S_ISDIR(own.st_mode) or own.st_uid != os.geteuid():
        raise _not_own(private)


def _not_own(private: str) -> ConfigError:
    return _unusable(
        private,
        f"not a directory of this user (uid {os.geteuid()}): another user made it, and"
        " could have put a trust cache of their own in it; remove it",
    )


def _create(directory: str) -> None:
    """``directory`` 0700, its missing parents 0755 (not writable by others: else they
    could rename it away), whatever the umask."""
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.exists(parent):
        _create(parent)
        os.chmod(parent, 0o755)
    try:
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise _unusable(directory, e.strerror) from None


def _move_in(old: str, new: str) -> None:
    """Move a file a former version kept at the top into ``private``, if it is this user's."""
    try:
        found = os.lstat(old)
    except FileNotFoundError:
        return
    if os.path.lexists(new):
        return
    if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
        log.warn(
            "{path} is not this user's own file: not used (another user may have put it there)",
            path=old,
        )
        return
    os.replace(old, new)
    # Checked again where only this user can write: the name may have been swapped since.
    try:
        fd = os.open(new, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # a link swapped in
        fd = None
    try:
        moved = None if fd is None else os.fstat(fd)
        if moved is None or not stat.S_ISREG(moved.st_mode) or moved.st_uid != os.geteuid():
            os.unlink(new)
            log.warn(
                "{path} was replaced while it was moved: not used (another user may have put"
                " it there)",
                path=old,
            )
            return
        os.fchmod(fd, 0o600)
    finally:
        if fd is not None:
            os.close(fd)
    log.info("moved {old} to {new}", old=old, new=new)


def _unusable(path: str, reason: str) -> ConfigError:
    return ConfigError(f"[cache] path: state directory {path}: {reason}")
