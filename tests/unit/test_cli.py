"""``license-proxy check``: the exit status and the one line, in process."""

from __future__ import annotations

from license_proxy import cli
from tests.support.configs import write


def test_check_exits_2_on_a_malformed_https_proxy(tmp_path, capsys):
    path = write(tmp_path, f'[cache]\npath = "{tmp_path}/state/trust-cache.json"\n')
    assert cli.check(path, {"DEEPGRAM_API_KEY": "k", "HTTPS_PROXY": "http://"}) == 2
    assert capsys.readouterr() == (
        "", "license-proxy: environment variable HTTPS_PROXY: expected a proxy URL with a host,"
        " such as http://proxy:3128\n",
    )
    assert cli.check(path, {"DEEPGRAM_API_KEY": "k", "HTTPS_PROXY": "http://proxy:3128"}) == 0
    assert not (tmp_path / "state").exists()  # a check creates nothing
