"""The state directory: private when the proxy makes it, a ``private/`` in it when others can
write it, and ``check`` refusing, without changing anything, what ``prepare`` would refuse."""

from __future__ import annotations

import os
import stat

import pytest

from license_proxy import statedir
from license_proxy.config import Config, ConfigError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def config_in(directory) -> Config:
    return Config(cache_path=str(directory / "trust-cache.json"))


@pytest.mark.parametrize("shared", [0o777, 0o770, 0o2775, 0o720])
def test_a_directory_its_group_or_others_can_write_keeps_the_files_in_private(tmp_path, shared):
    """An emptyDir (0777) and fsGroup's volumes (0770, 2775: group-writable) alike."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, shared)
    prepared = statedir.prepare(config_in(state))
    assert prepared.cache_path == str(state / "private" / "trust-cache.json")
    assert mode(state / "private") == 0o700


def test_a_directory_only_its_owner_can_write_is_used_as_it_is(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    assert statedir.prepare(config_in(state)).cache_path == str(state / "trust-cache.json")
    assert not (state / "private").exists()


def test_private_is_brought_back_to_0700_at_every_start(tmp_path):
    """fsGroup's kubelet adds g+rwx to everything in the volume at every mount."""
    state = tmp_path / "state"
    (state / "private").mkdir(parents=True)
    os.chmod(state, 0o2775)
    os.chmod(state / "private", 0o2770)
    statedir.prepare(config_in(state))
    assert mode(state / "private") == 0o700


@pytest.mark.parametrize(
    "where, reason",
    [
        ("/etc/hostname/trust-cache.json", "state directory /etc/hostname: not a directory"),
        ("/etc/hostname/a/b/trust-cache.json", "state directory /etc/hostname/a/b: Not a directory"),
    ],
)
def test_check_refuses_what_prepare_refuses(where, reason):
    config = Config(cache_path=where)
    for step in (statedir.check, statedir.prepare):
        with pytest.raises(ConfigError) as info:
            step(config)
        assert str(info.value) == f"[cache] path: {reason}", step


def test_check_refuses_another_users_private_and_changes_nothing(tmp_path):
    state = tmp_path / "state"
    (state / "private").mkdir(parents=True)
    os.chmod(state, 0o777)
    os.chmod(state / "private", 0o755)
    os.chown(state / "private", 65534, 65534)
    with pytest.raises(ConfigError) as info:
        statedir.check(config_in(state))
    assert str(info.value).startswith(
        f"[cache] path: state directory {state}/private: not a directory of this user"
    )
    assert mode(state / "private") == 0o755


def test_check_creates_nothing(tmp_path):
    statedir.check(config_in(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []


def test_a_link_as_private_is_refused_and_what_it_names_is_left_alone(tmp_path):
    state, mine = tmp_path / "state", tmp_path / "mine"
    state.mkdir()
    mine.mkdir(mode=0o755)
    state.chmod(0o777)
    (state / "private").symlink_to(mine)
    with pytest.raises(ConfigError, match="private: not a directory of this user"):
        statedir.prepare(config_in(state))
    assert stat.S_IMODE(os.lstat(mine).st_mode) == 0o755
