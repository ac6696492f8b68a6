"""The built wheel carries the twistd plugin, and an installed copy lists it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    twistd = str(Path(sys.executable).parent / "twistd")
    listing = subprocess.run([twistd, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "license-proxy" in listing.stdout, listing.stdout + listing.stderr
    # The plugin twistd found is the wheel's copy, not one from the source tree.
    where = subprocess.run(
        [sys.executable, "-c", "import twisted.plugins.license_proxy_plugin as p; print(p.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert where.stdout.strip() == str(target / "twisted" / "plugins" / "license_proxy_plugin.py")
    usage = subprocess.run(
        [twistd, "license-proxy", "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert "--config" in usage.stdout, usage.stdout + usage.stderr
