"""tests/support/secretvolume.py, the Kubernetes Secret volume stand-in, laid out and updated as kubelet does."""

from __future__ import annotations

import os

from tests.support.secretvolume import SecretVolume


def test_a_secret_volume_is_laid_out_and_updated_as_kubelet_does(tmp_path):
    volume = SecretVolume(tmp_path / "secret")
    volume.update({"tls.crt": b"one"})
    first = os.readlink(tmp_path / "secret" / "..data")
    assert first.startswith("..2026_") and "/" not in first
    assert os.readlink(volume.path("tls.crt")) == "..data/tls.crt"
    volume.update({"tls.crt": b"two"})
    second = os.readlink(tmp_path / "secret" / "..data")
    assert second != first and not (tmp_path / "secret" / first).exists()
    assert open(volume.path("tls.crt"), "rb").read() == b"two"
    assert sorted(os.listdir(tmp_path / "secret")) == sorted(["..data", second, "tls.crt"])
