"""The built wheel carries the twistd plugin and the man pages, and an installed copy lists
the plugin, has the license-proxy and hermes commands, and ``man license-proxy`` finds its page."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_plugin_and_twistd_lists_it(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("license_proxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/license_proxy_plugin.py" in names
    # An __init__.py there would shadow Twisted's own package.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "license_proxy-0.1.0.data/data/share/man/man8/license-proxy.8" in names
    assert "license_proxy-0.1.0.data/data/share/man/man1/license-proxy-status.1" in names

    # An operator's install: a fresh virtual environment with the wheel and its dependencies.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True,
    )
    listing = subprocess.run(
        [str(venv / "bin" / "twistd"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert "license-proxy" in listing.stdout, listing.stdout + listing.stderr
    usage = subprocess.run(
        [str(venv / "bin" / "twistd"), "license-proxy", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "--config" in usage.stdout, usage.stdout + usage.stderr
    assert "--log-format" in usage.stdout, usage.stdout + usage.stderr
    status = subprocess.run(
        [str(venv / "bin" / "license-proxy-status"), "--help"], capture_output=True, text=True
    )
    assert "--warn-after" in status.stdout, status.stdout + status.stderr
    # The vendor's command line, under both names: a check of the built-in defaults.
    for name in ("license-proxy", "hermes"):
        checked = subprocess.run(
            [str(venv / "bin" / name), "-v", "check"], capture_output=True, text=True,
            env={"DEEPGRAM_API_KEY": "k", "PATH": "/usr/bin:/bin"},
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("license-proxy: the built-in defaults: OK"), checked

    # man-db maps each PATH entry's bin/ to ../share/man: with the venv's bin on PATH (as an
    # activated venv has it), `man license-proxy` finds the venv's page; -M names it too.
    man_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "MANWIDTH": "80", "MANPAGER": "cat"}
    for name, section in (("license-proxy", 8), ("license-proxy-status", 1)):
        where = subprocess.run(["man", "-w", name], capture_output=True, text=True, env=man_env)
        assert where.stdout.strip() == str(venv / f"share/man/man{section}/{name}.{section}"), (
            where.stdout + where.stderr
        )
    page = subprocess.run(["man", "license-proxy"], capture_output=True, text=True, env=man_env)
    assert "drop-in License Proxy for self-hosted speech containers" in page.stdout, page
    page = subprocess.run(
        ["man", "-M", str(venv / "share/man"), "1", "license-proxy-status"],
        capture_output=True, text=True, env={**man_env, "PATH": "/usr/bin:/bin"},
    )
    assert "--warn-after" in page.stdout.replace("\u2010", "-"), page
