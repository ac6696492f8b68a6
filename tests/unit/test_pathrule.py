"""The path rule: what the relay refuses instead of appending below ``server_url``."""

from __future__ import annotations

import pytest

from license_proxy.pathrule import refusal

#: Issue 20 item 8: forwarded before, each read as leaving the prefix by some decoding.
GAPS = [
    b"..%3b/admin",  # "..;" once decoded (Tomcat)
    b"..%00/admin",  # NUL (C stops there)
    b"%c0%ae%c0%ae/admin",  # overlong UTF-8 "."
    b"%252e%252e/admin",  # double encoding
    b"..%252fadmin",
    b"%u002e%u002e/admin",  # IIS %u
    b"..%2",  # malformed
    b"%%32%65%%32%65/admin",  # "%2e" after one decoding
]

REFUSED_BEFORE = [b"..%2Fadmin", b"%2E%2E%2Fadmin", b"a%2F..%2F..%2Fadmin", b"..%5Cadmin",
                  b"..;/admin", b"../admin", b"a/./b", b"a/%2E", b"%2e%2E;x/admin", b".."]


@pytest.mark.parametrize("path", GAPS + REFUSED_BEFORE)
def test_refused(path):
    assert refusal(path) is not None


@pytest.mark.parametrize("path", [b"", b"v1/license", b"a%20b/..x/c.d", b"caf%C3%A9", b"a;b/c",
                                  b"...", b"%7Euser", b"a.b/.c/d..", b"%41%42"])
def test_relayed(path):
    assert refusal(path) is None


def test_each_kind_says_why():
    assert [refusal(p) for p in (b"%u002e", b"%252e", b"%00", b"%0a", b"%c0%ae", b"..%3b")] == [
        "malformed %-escape in the path",
        "double-encoded % in the path",
        "encoded NUL or control byte in the path",
        "encoded NUL or control byte in the path",
        "escape that is not UTF-8 (an overlong form) in the path",
        "dot segment or encoded / or \\ in the path",
    ]
