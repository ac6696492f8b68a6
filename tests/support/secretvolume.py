"""
A directory laid out as kubelet lays out a Secret volume, and updated as kubelet updates it.

    dir/..2026_12_01_23_00_00.000000001/tls.crt   the files, in a timestamped directory
    dir/..data -> ..2026_12_01_23_00_00.000000001
    dir/tls.crt -> ..data/tls.crt                 the paths a config names

An update writes a new timestamped directory, flips ``..data`` to it at once (a new symlink renamed
over the old one) and removes the old directory: files are never half-written, but every path
changes where it leads, and the old files are gone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class SecretVolume:
    def __init__(self, directory) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def path(self, name: str) -> str:
        """The path a config names for the file ``name``."""
        return str(self.directory / name)

    def update(self, files: dict[str, bytes]) -> None:
        """Put ``files`` (name -> contents) in place of the current ones, as kubelet does."""
        self._generation += 1
        timestamped = f"..2026_12_01_23_00_00.{self._generation:09d}"
        (self.directory / timestamped).mkdir()
        for name, contents in files.items():
            (self.directory / timestamped / name).write_bytes(contents)
        data = self.directory / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        flipping = self.directory / "..data_tmp"
        os.symlink(timestamped, flipping)
        os.replace(flipping, data)
        for name in files:
            link = self.directory / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if previous is not None:
            shutil.rmtree(self.directory / previous)
