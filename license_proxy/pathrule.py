"""
Which request paths the relay refuses (400) instead of appending them below ``server_url``.

The proxy can't know how the license server, or a server in front of it, decodes a path:
once (most), twice (a rewrite after a decode), as ``%uXXXX`` (IIS), leniently (a stray
``%`` kept, an overlong UTF-8 sequence read as its ASCII look-alike), or up to a NUL (C).
So it refuses every path that some such decoding could read as leaving ``server_url``'s
path, rather than guess one decoding and normalise: anything in it that is not a
well-formed escape of a UTF-8 byte sequence, and then, in the path decoded once, a dot
segment (also with ``;parameters``: Tomcat reads ``..;`` as ``..``) or a ``/`` or ``\\``
that was encoded (nginx decodes ``%2F`` before it routes).
"""

from __future__ import annotations

import re
from typing import Optional
from urllib.parse import unquote_to_bytes

# A "%" not followed by two hex digits: "%u002e", "..%2", "%%32%65".
_MALFORMED = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# "%25" decodes to "%": a second decoding would read what follows as an escape.
_DOUBLE = re.compile(rb"%25", re.IGNORECASE)
_SEPARATOR = re.compile(rb"%2f|%5c", re.IGNORECASE)
# Bytes C and many parsers stop at or split on.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_DOT_SEGMENT = re.compile(rb"(^|/)\.{1,2}(;[^/]*)?(/|$)")


def refusal(path: bytes) -> Optional[str]:
    """Why ``path`` (the target's path, without its query) is refused, or None."""
    if _MALFORMED.search(path):
        return "malformed %-escape in the path"
    if _DOUBLE.search(path):
        return "double-encoded % in the path"
    decoded = unquote_to_bytes(path)
    if _CONTROL.search(decoded):
        return "encoded NUL or control byte in the path"
    try:
        decoded.decode("utf-8")  # strict: refuses overlong forms such as %c0%ae
    except UnicodeDecodeError:
        return "escape that is not UTF-8 (an overlong form) in the path"
    if _DOT_SEGMENT.search(decoded) or _SEPARATOR.search(path):
        return "dot segment or encoded / or \\ in the path"
    return None
