"""
The page for people, ``GET /`` on the status listener: the state in words, the trust
window's time left, the license servers (and peers), the trust cache and the last 24 hours
(``timeline``), for the person on call with a browser and no Grafana.

The status port is often exposed wider than the licensing port, so the page shows only
what ``/v1/status`` and ``/metrics`` already show: no key, no credential, no request path.
It is one self-contained document (no script, font, image or stylesheet fetched; the SVG
is inline), allowed nothing else by its ``Content-Security-Policy``, readable without
colour (every band, bar and row says what it is in words), and it reloads itself.

Probes and Prometheus share the listener, so a page is rendered at most once a second
(``timers``); any number of readers in between get the same bytes.  The work of a render is
bounded by the ring's size, not by the traffic.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from html import escape
from typing import Callable, Optional, Sequence

from attrs import define, field
from twisted.internet.interfaces import IReactorTime

from .config import span
from .health import Server
from .metrics import OUTCOMES, SERVED_FROM_TRUST
from .status import CONNECTED, FAILED, READY, TRUST_BASED, Status, rfc3339
from .timeline import EVERY, SAMPLES, Sample, Timeline
from .trustcache import TrustCache

RELOAD = 10
"""Seconds between the page's own reloads."""

FRESH = 1.0
"""Seconds a rendered page is served again before the next render."""

_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:62em;padding:0 1em;color:#111}
h1{font-size:1.4em;margin:0}h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#555;margin:.2em 0 1em}
.state{font-size:1.25em;padding:.6em .8em;border:3px solid #111;border-radius:4px}
.Connected{background:#dff3df}.TrustBased{background:#fff0c8;border-style:dashed}
.Failed{background:#f8d4d4;border-style:double;border-width:6px}.Ready{background:#eee}
table{border-collapse:collapse}th,td{text-align:left;padding:.2em .9em .2em 0;vertical-align:top}
.down{font-weight:bold}svg{display:block;max-width:100%;height:auto}
svg text{font:12px system-ui,sans-serif}
dt{float:left;clear:left;width:11em;color:#555}dd{margin:0 0 .2em 11em}
"""

CSP = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
    + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""Nothing but the one ``<style>`` element, by its hash."""

#: Each outcome's row in the timeline, in words.
_OUTCOME_WORDS = {
    "upstream_ok": "answered by the license server",
    "upstream_4xx": "4xx from the license server",
    SERVED_FROM_TRUST: "answered from trust",
    "served_by_peer": "answered by a peer",
    "unavailable": "unavailable (502)",
    "rejected": "rejected at the door",
}

#: The state bands' fills: a pattern each, so they differ without colour too.
_BAND_FILLS = {
    READY: "url(#ready)",
    CONNECTED: "#bfe3bf",
    TRUST_BASED: "url(#trust)",
    FAILED: "url(#failed)",
}
_DEFS = (
    '<defs><pattern id="trust" width="8" height="8" patternUnits="userSpaceOnUse"'
    ' patternTransform="rotate(45)"><rect width="8" height="8" fill="#ffe08a"/>'
    '<rect width="3" height="8" fill="#8a6d00"/></pattern>'
    '<pattern id="failed" width="6" height="6" patternUnits="userSpaceOnUse">'
    '<rect width="6" height="6" fill="#b00020"/><path d="M0 0L6 6M6 0L0 6" stroke="#fff"/>'
    '</pattern><pattern id="ready" width="6" height="6" patternUnits="userSpaceOnUse">'
    '<rect width="6" height="6" fill="#eee"/><circle cx="3" cy="3" r="1.2" fill="#555"/>'
    "</pattern></defs>"
)

# The timeline's geometry, in SVG units.
_LEFT, _PLOT, _BAND, _ROW = 190, 760, 26, 34
_BUCKETS = 190  # columns of the relay rows: about 7.6 minutes, 4 units each
_TICK = 3 * 3600  # seconds between the time axis's labels


@define
class Overview:
    """Renders the page, at most once per ``FRESH`` seconds."""

    _dates: IReactorTime  # what the page shows (``clock``)
    _timers: IReactorTime  # how long a render is served (the reactor)
    _status: Status
    _cache: TrustCache
    _servers: Sequence[Server]  # the license servers' ``Health.servers``
    _timeline: Timeline
    _version: str
    _duration: float  # [trust] duration
    #: The peers' ``Health.servers`` now (found by DNS, they come and go); none without peers.
    _peers: Callable[[], Sequence[Server]] = tuple
    _page: bytes = field(default=b"", init=False)
    _rendered_at: float = field(default=float("-inf"), init=False)

    def page(self) -> bytes:
        now = self._timers.seconds()
        if not 0 <= now - self._rendered_at < FRESH:
            self._page = self.render().encode("utf-8")
            self._rendered_at = now
        return self._page

    def render(self) -> str:
        now = self._dates.seconds()
        state = self._status.state
        parts = [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{RELOAD}">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>license-proxy: {state}</title><style>{_STYLE}</style></head><body>"
            "<h1>license-proxy</h1>"
            f'<p class="meta">version {escape(self._version)} · shown at {_at(now, now, True)}'
            f" · reloads every {RELOAD} s · <a href=\"/v1/status\">/v1/status</a>"
            ' · <a href="/metrics">/metrics</a></p>',
            f'<p class="state {state}" id="state">{self._words(state, now)}</p>',
            self._trust(state, now),
            _servers("License servers", self._servers, now),
        ]
        peers = self._peers()
        if peers:
            parts.append(_servers("Peers", peers, now))
        day = [*self._timeline.samples, self._timeline.current()]
        parts += [self._trust_cache(now), _timeline(day, now), "</body></html>"]
        return "".join(parts)

    def _words(self, state: str, now: float) -> str:
        since = _at(self._status.state_since, now)
        expiration = self._status.trust_expiration
        if state == CONNECTED:
            return "<strong>Connected</strong>: the license server answers."
        if state == TRUST_BASED:
            return (
                f"<strong>TrustBased</strong> since {since} — the fleet stays licensed until"
                f" {_at(expiration, now)} without the license server"
                f" ({span(expiration - now)} left)."
            )
        if state == FAILED:
            closed = "never opened" if expiration is None else f"closed at {_at(expiration, now)}"
            return (
                f"<strong>Failed</strong> since {since}: the license server does not answer and"
                f" the trust window {closed}; containers are not being licensed."
            )
        return f"<strong>Ready</strong> since {since}: started; no check-in has completed yet."

    def _trust(self, state: str, now: float) -> str:
        expiration = self._status.trust_expiration
        last = self._cache.last_checkin
        if expiration is None:
            return (
                "<h2>Trust window</h2><p>No successful check-in yet: nothing to answer from"
                " trust.</p>"
            )
        left = max(0.0, min(expiration - now, self._duration))
        width = round(600 * left / self._duration) if self._duration else 0
        until = _at(expiration, now, markup=False)
        words = (
            f"{span(left)} left of {span(self._duration)}, until {until}"
            if left > 0
            else f"expired at {until}"
        )
        fill = "url(#trust)" if state == TRUST_BASED else _BAND_FILLS[CONNECTED]
        return (
            f'<h2>Trust window</h2><p id="trust-left">{words}; last successful check-in'
            f" {_at(last, now)} ({span(now - last)} ago).</p>"
            f'<svg viewBox="0 0 602 30" width="602" height="30" role="img"'
            f' aria-label="trust window: {words}">{_DEFS}'
            f'<rect x="1" y="1" width="600" height="28" fill="#fff" stroke="#111"/>'
            f'<rect x="1" y="1" width="{width}" height="28" fill="{fill}"/>'
            f'<text x="8" y="20" fill="#000">{words}</text></svg>'
        )

    def _trust_cache(self, now: float) -> str:
        written = self._cache.last_written
        persisted = (
            "yes: the file holds what memory holds"
            if self._cache.persisted
            else "<strong>NO</strong>: the file cannot be written"
            f" ({escape(self._cache.write_error or '')}); a restart would lose the answers"
            " since its last write"
        )
        return (
            "<h2>Trust cache</h2><dl>"
            f'<dt>answers held</dt><dd id="entries">{len(self._cache)}</dd>'
            "<dt>last written</dt><dd>"
            + ("not since the start" if written is None else
               f"{_at(written, now)} ({span(now - written)} ago)")
            + f'</dd><dt>persisted</dt><dd id="persisted">{persisted}</dd></dl>'
        )


def _at(when: Optional[float], now: float, seconds: bool = False, markup: bool = True) -> str:
    """A date for people, UTC, with the day when not today; in a ``<time>`` element
    unless ``markup`` is false (for an attribute or SVG text)."""
    if when is None:
        return "never"
    moment = datetime.fromtimestamp(when, timezone.utc)
    text = moment.strftime("%H:%M:%S" if seconds else "%H:%M")
    if moment.date() != datetime.fromtimestamp(now, timezone.utc).date():
        text = moment.strftime("%a %d %b ") + text
    return f'<time datetime="{rfc3339(when)}">{text} UTC</time>' if markup else f"{text} UTC"


def _servers(title: str, servers: Sequence[Server], now: float) -> str:
    rows = []
    for server in servers:
        if server.up:
            state = "up"
        else:
            state = f'<span class="down">DOWN</span> since {_at(server.down_since, now)}'
        last = server.last_exchange
        rows.append(
            f"<tr><td>{escape(server.url)}</td><td>{state}</td><td>"
            + ("none yet" if last is None else f"{_at(last, now)} ({span(now - last)} ago)")
            + f"</td><td>{escape(server.last_error or '—')}</td></tr>"
        )
    return (
        f"<h2>{title}</h2><table><tr><th>URL</th><th>state</th><th>last exchange</th>"
        f"<th>last error</th></tr>{''.join(rows)}</table>"
    )


def _timeline(samples: Sequence[Sample], now: float) -> str:
    """The last ``SAMPLES`` minutes as inline SVG: state bands, then a row per outcome."""
    start = now - SAMPLES * EVERY

    def x(when: float) -> int:
        return _LEFT + round(_PLOT * min(max(when - start, 0), now - start) / (now - start))

    top = 22
    height = top + _BAND + 8 + _ROW * len(OUTCOMES) + 24
    out = [
        "<h2>Last 24 hours</h2><p>A sample a minute, kept in memory: a restart starts the"
        " day again. State bands, then the relays per minute by outcome (each bar: the"
        f" average over {SAMPLES * EVERY / 60 / _BUCKETS:.1f} minutes).</p>"
        f'<svg viewBox="0 0 {_LEFT + _PLOT + 10} {height}" width="{_LEFT + _PLOT + 10}"'
        f' height="{height}" role="img" aria-label="the last 24 hours">{_DEFS}'
    ]
    # State bands: one rectangle per run of equal states, named when there is room.
    out.append(f'<text x="0" y="{top + 17}">state</text>')
    runs: list[list] = []
    for sample in samples:
        if runs and runs[-1][0] == sample.state and sample.at - runs[-1][2] <= 2 * EVERY:
            runs[-1][2] = sample.at
        else:
            runs.append([sample.state, sample.at - EVERY, sample.at])
    for state, begin, end in runs:
        left, right = x(begin), x(end)
        right = max(right, left + 2)  # a run of a minute or two is still seen
        out.append(
            f'<rect x="{left}" y="{top}" width="{right - left}" height="{_BAND}"'
            f' fill="{_BAND_FILLS.get(state, "#fff")}"><title>{state}</title></rect>'
        )
        if right - left > 8 * len(state) + 8:
            out.append(
                f'<rect x="{left + 3}" y="{top + 5}" width="{7 * len(state) + 6}" height="16"'
                f' fill="#fff"/><text x="{left + 6}" y="{top + 17}">{state}</text>'
            )
    # Relays per minute, a row per outcome, each scaled to its own peak.
    buckets = [[0] * _BUCKETS for _ in OUTCOMES]
    span_s = SAMPLES * EVERY / _BUCKETS
    for sample in samples:
        column = min(int((sample.at - start) / span_s), _BUCKETS - 1)
        if column < 0:
            continue
        for row, count in enumerate(sample.relays):
            buckets[row][column] += count
    per_minute = span_s / 60
    for row, outcome in enumerate(OUTCOMES):
        base = top + _BAND + 8 + _ROW * (row + 1) - 4
        values = buckets[row]
        total = sum(sample.relays[row] for sample in samples)
        peak = max(values) / per_minute
        out.append(
            f'<text x="0" y="{base - 14}">{_OUTCOME_WORDS[outcome]}</text>'
            f'<text x="0" y="{base}" fill="#444">{total:,} in all, peak {peak:.3g}/min</text>'
            f'<line x1="{_LEFT}" x2="{_LEFT + _PLOT}" y1="{base}" y2="{base}" stroke="#999"/>'
        )
        bars = []
        column = 0
        while column < _BUCKETS:
            h = round((_ROW - 8) * values[column] / max(values)) if values[column] else 0
            end = column + 1
            while end < _BUCKETS and values[end] and h and round(
                (_ROW - 8) * values[end] / max(values)
            ) == h:
                end += 1
            if h:
                left = _LEFT + _PLOT * column // _BUCKETS
                width = _LEFT + _PLOT * end // _BUCKETS - left
                bars.append(f"M{left} {base}v-{h}h{width}v{h}z")
            column = end
        if bars:
            out.append(f'<path d="{"".join(bars)}" fill="#333"/>')
    # The time axis: every three hours of UTC, and now.
    axis = height - 6
    ticks = [(when, _hhmm(when), "middle") for when in range(
        int(start // _TICK + 1) * _TICK, int(now - _TICK / 3), _TICK
    )]
    for when, label, anchor in ticks + [(now, "now", "end")]:
        out.append(
            f'<line x1="{x(when)}" x2="{x(when)}" y1="{top}" y2="{axis - 12}" stroke="#ccc"/>'
            f'<text x="{x(when)}" y="{axis}" text-anchor="{anchor}">{label}</text>'
        )
    out.append("</svg>")
    legend = " · ".join(
        f"{state}: {pattern}"
        for state, pattern in (
            (CONNECTED, "plain green"),
            (TRUST_BASED, "diagonal stripes"),
            (FAILED, "crossed"),
            (READY, "dotted"),
        )
    )
    out.append(f"<p class=\"meta\">Bands: {legend}; times UTC.</p>")
    return "".join(out)


def _hhmm(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).strftime("%H:%M")
