"""
Configuration files for tests: the text a real proxy in front of a test upstream is started
on, and a text loaded (or refused) through ``license_proxy.config`` as the proxy would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from license_proxy.config import Config, ConfigError, load
from tests.support.proxy import free_port

# The readiness probe of the vendor's Helm chart, as a regular expression.
PROBE = re.compile(r'^\{.*"state":"(Connected|TrustBased)".*\}$', re.MULTILINE)
KEY = "lk-0123456789-secret"


def config(tmp_path, pki, upstream_url, *, license="", trust="", server="", startup_timeout="3s"):
    return f"""
[server]
host = "127.0.0.1"
port = {free_port()}
status_port = {free_port()}
{server}

[license]
server_url = "{upstream_url}"
ca_file = "{pki.ca_cert}"
timeout = "2s"
startup_timeout = "{startup_timeout}"
{license}

[trust]
{trust or 'duration = "1h"'}

[cache]
path = "{tmp_path}/state/trust-cache.json"
"""


def write(tmp_path: Path, text: str | bytes, name: str = "license-proxy.toml") -> str:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return str(path)


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), environ or {})


def error(tmp_path: Path, text: str | bytes, environ: dict[str, str] | None = None) -> str:
    """The ConfigError message minus the path, checked to be one line starting with the path."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ or {})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")
