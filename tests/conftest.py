"""Shared fixtures: a test PKI, and a real TLS upstream license server on loopback."""

from __future__ import annotations

import pytest

from tests.support.pki import Pki, make_pki
from tests.support.upstream import Upstream


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def upstream(pki):
    """A started TLS upstream with the good server certificate; stopped after the test."""
    with Upstream(pki.server_cert, pki.server_key) as up:
        yield up
