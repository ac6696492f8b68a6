"""
The trust cache in memory: the last good answer to each licensing request, by key,
with the date it was stored.  No disk and no Twisted here: the file (``cachefile``)
and its writer (``cachewriter``) follow it, and another instance can be handed its
entries (``entries``, ``offer``) without either.

Requests are keyed by an HMAC over method, path, query and credentials, with a
random salt (kept in the file): credentials never reach the disk in clear, and
one licensee's answer is never returned to another.  Keys are only comparable
under the same salt.  An answer whose ``Vary`` names request headers is kept
under a variant of that key (``variant``) that adds their values; the key string
names those headers, so the keys alone say which headers a later request's
lookup must add.

Its size is bounded (``max_entries``): a client varying its query string adds an
entry per request.  When full, the answer stored longest ago makes room, taken
first among those not yet kept: an answer is kept once it is stored again
``keep_after`` (a check-in interval) or more after it was first stored.  A fleet
stores its own again at every check-in, so a flood of one-off requests (each sent
twice in a row, too) evicts its own kind (answers restored from a file or offered
by a peer count as kept).

Each answer is kept as the JSON it is written as, and decoded only when it is
served from trust: the common path stores, and rarely reads.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import math
import secrets
from typing import Callable, Iterable, Iterator, Optional, Protocol, Sequence

from attrs import define, evolve, field, frozen

from .defaults import DEFAULT_MAX_ENTRIES

DEFAULT_KEEP_AFTER = 60.0
"""Seconds between two stores of an answer for it to count as kept (the check-in interval)."""

STORED_AT_LAG = 300.0
"""Seconds the time of an answer stored again unchanged may lag on disk: the
same answer is reported as a change again only once the time reported is this old,
so a fleet checking in every minute does not write every answer every minute (after
a restart, its ``Age`` may read up to this much too old)."""

SHARED_ANSWERS = 16
"""Distinct answers remembered, so that an answer equal to one of them is kept once: a
fleet whose requests differ (by instance, by query) often gets the same answer to each."""

_VARIANT = ";"
"""Separates a key, the names its answer varies on, and their values' HMAC (no header name
holds it)."""


class RequestHeaders(Protocol):
    """What ``variant`` reads of a request's headers (``twisted.web.http_headers.Headers``)."""

    def getRawHeaders(self, name: bytes) -> Optional[Sequence[bytes]]: ...


@frozen
class Entry:
    """One cached answer, as the upstream gave it."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored_at: float

    @classmethod
    def from_json(cls, obj: dict) -> Entry:
        return cls(
            status=int(obj["status"]),
            headers=tuple((_unb64(n), _unb64(v)) for n, v in obj["headers"]),
            body=_unb64(obj["body"]),
            stored_at=finite(obj["stored_at"]),
        )


def finite(value: object) -> float:
    """A date read from a file or a peer: a number, never NaN or an infinity (JSON's parser
    takes both, and either would break every Age computed from it)."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a date: {value!r}")
    return number


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _answer(entry: Entry) -> bytes:
    """The answer's JSON members, without braces or time: as it is kept and written."""
    text = json.dumps(
        {
            "status": entry.status,
            "headers": [[_b64(n), _b64(v)] for n, v in entry.headers],
            "body": _b64(entry.body),
        },
        separators=(",", ":"),
    )
    return text[1:-1].encode("ascii")


@define(weakref_slot=False)
class Kept:
    """An answer in memory: its JSON members (``answer``), when it was stored, and the
    time last reported as a change (what the file has)."""

    answer: bytes
    stored_at: float
    on_disk: float

    def entry(self) -> Entry:
        obj = json.loads(b"{" + self.answer + b"}")
        return Entry.from_json({**obj, "stored_at": self.stored_at})


def shared_salt(secret: bytes) -> bytes:
    """The key salt of the caches of peers sharing ``secret`` (``[peers] salt_file``): derived
    from it, so the secret itself is never in a cache file, which holds its salt."""
    return hmac.new(secret, b"license-proxy cache key salt", hashlib.sha256).digest()


@define
class MemoryCache:
    """Cached answers by key, bounded, with what changed since it was last asked."""

    #: The time now, in dates (``clock``): when an answer was first stored, for ``keep_after``.
    _now: Callable[[], float]
    salt: bytes = field(factory=lambda: secrets.token_bytes(16))
    max_entries: int = DEFAULT_MAX_ENTRIES
    #: Seconds after its first store that a new store of an answer makes it kept.
    keep_after: float = DEFAULT_KEEP_AFTER
    # In the order they were stored: the first is the one stored longest ago.
    _entries: dict[str, Kept] = field(factory=dict, init=False)
    # Keys not yet kept, oldest first, with the time of their first store: evicted before
    # the answers a fleet keeps asking for, so a flood of one-off requests cannot push those out.
    _once: dict[str, float] = field(factory=dict, init=False)
    # Key -> the request headers its latest answer varied on (from the variant keys), and
    # how many variants of it are kept: forgotten with the last, so a flood of answers
    # with Vary can't grow it past max_entries.
    _varies: dict[str, tuple[bytes, ...]] = field(factory=dict, init=False)
    _variants: dict[str, int] = field(factory=dict, init=False)
    # The answers stored last, each its own key: a new one equal to one of these is kept
    # as the same bytes (see ``SHARED_ANSWERS``).
    _recent: dict[bytes, bytes] = field(factory=dict, init=False)
    # Answers stored (or evicted: None) since ``take_changes``: the journal's next lines.
    _changes: dict[str, Optional[Kept]] = field(factory=dict, init=False)
    evictions: int = field(default=0, init=False)

    def key(
        self,
        method: bytes,
        target: bytes,
        credentials: Iterable[tuple[bytes, bytes]],
    ) -> str:
        """
        The cache key of a request: method, path and query (``target``), and
        the credential headers, in the order given (the caller's: names in a
        fixed order, each name's values as sent).  The body is not part of it:
        the licensing protocol is not public, and a body that carries a
        timestamp or a usage counter would never match again.
        """
        mac = hmac.new(self.salt, digestmod=hashlib.sha256)
        for part in (method, target):
            mac.update(len(part).to_bytes(4, "big") + part)
        for name, value in credentials:
            mac.update(len(name).to_bytes(4, "big") + name)
            mac.update(len(value).to_bytes(4, "big") + value)
        return mac.hexdigest()

    def variant(
        self, key: str, headers: RequestHeaders, vary: Optional[Sequence[bytes]] = None
    ) -> str:
        """
        The key, under ``key``, of the answer to a request with ``headers`` when
        answers vary (``Vary``) on the request headers ``vary`` (lower case,
        sorted): the answer's, at a store; at a lookup (None), those the latest
        answer stored for ``key`` varied on.  ``key`` itself when there are none.
        """
        names = self._varies.get(key, ()) if vary is None else tuple(vary)
        if not names:
            return key
        mac = hmac.new(self.salt, key.encode("ascii"), digestmod=hashlib.sha256)
        for name in names:
            values = headers.getRawHeaders(name)
            mac.update(b"-" if values is None else len(values).to_bytes(4, "big"))
            for value in values or ():
                mac.update(len(value).to_bytes(4, "big") + value)
        listed = b",".join(names).decode("ascii")
        return f"{key}{_VARIANT}{listed}{_VARIANT}{mac.hexdigest()}"

    def _remember_variant(self, key: str, new: bool) -> None:
        primary, _, rest = key.partition(_VARIANT)
        if not rest:
            self._varies.pop(primary, None)
            return
        listed = rest.partition(_VARIANT)[0]
        self._varies[primary] = tuple(n.encode("ascii") for n in listed.split(","))
        if new:
            self._variants[primary] = self._variants.get(primary, 0) + 1

    def _forget_variant(self, key: str) -> None:
        primary, _, rest = key.partition(_VARIANT)
        if rest:
            self._variants[primary] -= 1
            if not self._variants[primary]:
                del self._variants[primary]
                self._varies.pop(primary, None)

    def lookup(self, key: str) -> Optional[Entry]:
        """The answer kept for ``key``, decoded (this is the stale path: rare)."""
        kept = self._entries.get(key)
        return None if kept is None else kept.entry()

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> Iterator[tuple[str, Entry]]:
        """Every answer held, with the date it was stored, the one stored longest ago
        first (decoded: for a hand-over, not the request path)."""
        for key, kept in list(self._entries.items()):
            yield key, kept.entry()

    def fingerprint(self) -> str:
        """What tells whether another cache keys with the same ``salt`` (its HMAC of a fixed
        text), without telling the salt."""
        return hmac.new(self.salt, b"license-proxy salt fingerprint", hashlib.sha256).hexdigest()

    def page(self, start: int, count: int) -> list[tuple[str, Kept]]:
        """At most ``count`` answers held, as kept, from the ``start``-th stored longest ago
        (a pull by a peer, in pages: one changing meanwhile may skip or repeat one)."""
        return list(itertools.islice(self._entries.items(), start, start + count))

    def store(self, key: str, entry: Entry) -> bool:
        """
        Keep ``entry``, last in line for eviction.  Whether it is a change to report
        (``take_changes``): the answer changed, or the time reported is ``STORED_AT_LAG`` old.
        """
        now = self._now()
        old = self._entries.pop(key, None)
        if old is None and len(self._entries) >= self.max_entries:
            self._evict()
        if old is None:
            self._once[key] = now
        elif now - self._once.get(key, now) >= self.keep_after:
            self._once.pop(key)  # asked for again a check-in later: kept
        self._remember_variant(key, new=old is None)
        answer = self._shared(_answer(entry))
        if old is not None and old.answer == answer:
            kept = self._entries[key] = old
            kept.stored_at = entry.stored_at
            if entry.stored_at - kept.on_disk < STORED_AT_LAG:
                return False
        else:
            kept = self._entries[key] = Kept(answer, entry.stored_at, entry.stored_at)
        kept.on_disk = entry.stored_at
        self._changes[key] = kept
        return True

    def offer(self, key: str, entry: Entry) -> bool:
        """
        Keep ``entry`` with the date it was stored (another instance's answer, under the
        same ``salt``; never later than now here, whatever the other's clock says) if
        nothing newer is held for ``key``; it counts as kept.  Whether it was taken (a
        change to report).
        """
        entry = evolve(entry, stored_at=min(entry.stored_at, self._now()))
        held = self._entries.get(key)
        if held is not None and held.stored_at >= entry.stored_at:
            return False
        if held is None and len(self._entries) >= self.max_entries:
            self._evict()
        self._entries.pop(key, None)
        self._once.pop(key, None)
        self._remember_variant(key, new=held is None)
        kept = self._entries[key] = Kept(
            self._shared(_answer(entry)), entry.stored_at, entry.stored_at
        )
        self._changes[key] = kept
        return True

    def restore(self, entries: Iterable[tuple[str, Entry]]) -> None:
        """Hold ``entries`` (read from a file, the one stored longest ago first) as kept,
        their times already on disk: nothing to report."""
        for key, entry in entries:
            self._entries[key] = Kept(self._shared(_answer(entry)), *[entry.stored_at] * 2)
            self._remember_variant(key, new=True)

    def _shared(self, answer: bytes) -> bytes:
        """``answer``, or the same bytes stored recently (kept once in memory)."""
        recent = self._recent
        found = recent.pop(answer, None)
        if found is None:
            found = answer
            if len(recent) >= SHARED_ANSWERS:
                del recent[next(iter(recent))]
        recent[found] = found
        return found

    def _evict(self) -> None:
        """Drop the answer stored longest ago among those not yet kept, if any, else among all."""
        oldest = next(iter(self._once or self._entries))
        del self._entries[oldest]
        self._once.pop(oldest, None)
        self._forget_variant(oldest)
        self._changes[oldest] = None  # the journal says it is gone
        self.evictions += 1

    def kept(self) -> dict[str, Kept]:
        """A copy of what is held, as kept (for a snapshot: bytes as they are written)."""
        return self._entries.copy()

    def take_changes(self) -> dict[str, Optional[Kept]]:
        """The answers stored (or evicted: None) since the last call, and start anew."""
        changes, self._changes = self._changes, {}
        return changes
