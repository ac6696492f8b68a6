"""The state directory at start: private when others can write it, checked on what is opened."""

from __future__ import annotations

import os
import stat

import pytest

from license_proxy import statedir
from license_proxy.config import Config, ConfigError

NOBODY = 65534
"""Another user: the tests run as root, and chown to it to play the one who planted a file."""


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("shared", [0o777, 0o770, 0o2775])  # emptyDir; fsGroup's modes
def test_a_directory_its_group_or_others_can_write_keeps_the_files_in_private(tmp_path, shared):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(shared)
    config = statedir.prepare(Config(cache_path=str(state / "trust-cache.json")))
    assert config.cache_path == str(state / "private" / "trust-cache.json")
    assert mode(state / "private") == 0o700


def test_private_is_brought_back_to_0700_at_every_start(tmp_path):
    state = tmp_path / "state"
    (state / "private").mkdir(parents=True)
    state.chmod(0o777)
    (state / "private").chmod(0o2770)  # what fsGroup's kubelet does at every mount
    statedir.prepare(Config(cache_path=str(state / "trust-cache.json")))
    assert mode(state / "private") == 0o700


def test_a_link_as_private_is_refused_and_what_it_names_is_left_alone(tmp_path):
    state, mine = tmp_path / "state", tmp_path / "mine"
    state.mkdir()
    mine.mkdir(mode=0o755)
    state.chmod(0o777)
    (state / "private").symlink_to(mine)
    with pytest.raises(ConfigError, match="private: not a directory of this user"):
        statedir.prepare(Config(cache_path=str(state / "trust-cache.json")))
    assert mode(mine) == 0o755
