"""
Replay the attacks of issue 14 (and the ones before it) against a running license-proxy,
and print one line per attack: its name, then ``refused``, ``safe``, ``UNSAFE`` or ``not
tested``, and what the proxy answered.  Only the standard library: run it from anywhere.

    python tests/attack.py --host 127.0.0.1 --port 8443 --status-port 8080 --ca ca.pem
    python tests/attack.py ... --outage --max-entries 10000 --checkin-interval 60

The attacks at the door need only the proxy.  With ``--outage``, the attacks on the trust
cache prime it while the license server is up, then ask on standard error for the license
server to be stopped (press Enter) and check what the proxy serves from trust: another
licensee's answer, a replayed ``Set-Cookie``, an answer a flood evicted.  The flood sends
``2 * max_entries`` distinct requests, each twice in a row, after the fleet's answers were
asked for twice a check-in interval apart (the wait follows the status page).  Attacks
whose precondition the license server does not meet (it sent no ``Set-Cookie``, no
``Vary``) say ``not tested`` and why.  The exit status is 1 if any line says ``UNSAFE``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import sys
import time
import urllib.request
from datetime import datetime
from typing import Callable, NamedTuple


class Answer(NamedTuple):
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class Target:
    """The proxy under attack: raw requests on fresh connections."""

    def __init__(self, args) -> None:
        self.host, self.port, self.base = args.host, args.port, args.base_url.encode()
        self.status_url = f"http://{args.host}:{args.status_port}/v1/status"
        self.context = None
        if not args.plain:
            self.context = ssl.create_default_context(cafile=args.ca)
            if args.ca is None:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE

    def raw(self, data: bytes, method: str = "GET") -> Answer:
        """Send ``data`` as it is; the answer (status 0: the connection closed without one)."""
        sock = socket.create_connection((self.host, self.port), timeout=10)
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_hostname=self.host)
        with sock:
            sock.sendall(data)
            response = http.client.HTTPResponse(sock, method=method)
            try:
                response.begin()
            except (http.client.HTTPException, ConnectionError):
                return Answer(0, http.client.HTTPMessage(), b"")
            return Answer(response.status, response.headers, response.read())

    def request(self, method: str, path: bytes, *headers: bytes, body: bytes = b"") -> Answer:
        """A well-formed request for ``base_url`` + ``path`` with extra header lines."""
        lines = [b"%s %s%s HTTP/1.1" % (method.encode(), self.base, path), b"Host: proxy"]
        lines += list(headers) + [b"Content-Length: %d" % len(body), b"Connection: close"]
        return self.raw(b"\r\n".join(lines) + b"\r\n\r\n" + body, method)

    def last_checkin(self) -> float:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            self.status_url, timeout=10
        ) as response:
            when = json.loads(response.read())["last_successful_checkin"]
        return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()


def refused(answer: Answer, *codes: int) -> tuple[str, str]:
    verdict = "refused" if answer.status in codes else "UNSAFE"
    return verdict, f"answered {answer.status or 'nothing'}"


def door_attacks(t: Target) -> dict[str, Callable[[], tuple[str, str]]]:
    """Refused before anything is sent to the license server."""
    attacks = {}
    for path in (b"..%2Fadmin", b"%2E%2E%2Fadmin", b"a%2F..%2F..%2Fadmin", b"..%2fadmin",
                 b"..%5Cadmin", b"..;/admin", b"../admin"):
        attacks[f"path escape {path.decode()}"] = lambda p=path: refused(t.request("GET", p), 400)
    for method in ("CONNECT", "TRACE", "PROPFIND"):
        attacks[f"method {method}"] = lambda m=method: _method(t, m)
    for byte in (b"\x01", b"\x7f"):
        attacks[f"control byte {byte!r} in a header value"] = lambda b=byte: refused(
            t.request("GET", b"probe", b"X-Token: a" + b + b"b"), 400
        )
    attacks["second Host header"] = lambda: refused(t.request("GET", b"probe", b"Host: evil"), 400)
    attacks["Transfer-Encoding split over two lines"] = lambda: refused(
        t.raw(b"POST %sprobe HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n"
              b"Transfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n" % t.base), 400
    )
    attacks["Content-Length with Transfer-Encoding"] = lambda: refused(
        t.raw(b"POST %sprobe HTTP/1.1\r\nHost: proxy\r\nContent-Length: 3\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" % t.base), 400
    )
    attacks["absolute URI (open proxy)"] = lambda: refused(
        t.raw(b"GET http://evil.example/ HTTP/1.1\r\nHost: evil.example\r\n\r\n"), 400, 404
    )
    attacks["HEAD answer's Content-Length"] = lambda: _head(t)
    return attacks


def _method(t: Target, method: str) -> tuple[str, str]:
    if method == "CONNECT":  # authority-form, as a client wanting a tunnel sends it
        answer = t.raw(b"CONNECT license.deepgram.com:443 HTTP/1.1\r\n"
                       b"Host: license.deepgram.com:443\r\n\r\n", method)
    else:
        answer = t.request(method, b"probe")
    verdict, said = refused(answer, 404, 405) if method == "CONNECT" else refused(answer, 405)
    return verdict, f"{said}, Allow: {answer.headers.get('Allow')}"


def _head(t: Target) -> tuple[str, str]:
    get, head = t.request("GET", b"head-probe"), t.request("HEAD", b"head-probe")
    sent = get.headers.get("Content-Length"), head.headers.get("Content-Length")
    if get.status != 200 or not get.body:
        return "not tested", f"GET answered {get.status} with {len(get.body)} bytes"
    verdict = "safe" if sent[0] == sent[1] == str(len(get.body)) else "UNSAFE"
    return verdict, f"Content-Length {sent[1]} for HEAD, {sent[0]} for GET"


# -- the peers' mark (issue 19): obeyed only on a connection with a peer certificate ----------


def peer_attacks(t: Target) -> dict[str, Callable[[], tuple[str, str]]]:
    """A client without a peer certificate marks its requests as a peer's: it must gain
    nothing (no answer from trust while the license server answers, no probe's 204)."""
    attacks = {
        f"peer mark {shown} on a cached {method}": lambda m=method, v=value: _marked(t, m, v)
        for method, value, shown in (("GET", b"x", "'x'"), ("GET", b"", "empty"),
                                     ("POST", b"ask", "'ask'"))
    }
    attacks["peer probe on TRACE /admin"] = lambda: refused(
        t.raw(b"TRACE /admin HTTP/1.1\r\nHost: proxy\r\nLicense-Proxy-Peer: probe\r\n"
              b"Connection: close\r\n\r\n", "TRACE"), 404, 405
    )
    attacks["peer probe without a peer certificate"] = lambda: _not_204(
        t.request("GET", b"peer-probe", b"License-Proxy-Peer: probe")
    )
    attacks["peer trust window without a peer certificate"] = lambda: _no_window(
        t.request("GET", b"peer-trust", b"License-Proxy-Peer: trust")
    )
    push = (b'[{"method":"GET","target":"pushed","headers":[],"status":200,'
            b'"answer_headers":[],"body":"","stored_at":4102444800}]')
    attacks["peer push of answers without a peer certificate"] = lambda: _not_204(
        t.request("POST", b"", b"License-Proxy-Peer: store", body=push)
    )
    return attacks


def _no_window(answer: Answer) -> tuple[str, str]:
    """A peer starting in an outage asks for the trust window; nobody else gets it."""
    gave = answer.status == 200 and b'"trust_expiration"' in answer.body
    return ("UNSAFE" if gave else "safe"), f"answered {answer.status or 'nothing'}"


def _marked(t: Target, method: str, value: bytes) -> tuple[str, str]:
    """The same request, once plain (so the proxy holds its answer), once marked: the marked
    one must be the license server's answer, not the one in trust (which carries ``Age``)."""
    sent = (method, b"peer-mark", b"Authorization: Token peer-mark")
    body = b'{"usage":1}' if method == "POST" else b""
    plain = t.request(*sent, body=body)
    if plain.status != 200 or "Age" in plain.headers:
        age = plain.headers.get("Age")
        return "not tested", f"the unmarked request answered {plain.status} (Age {age})"
    marked = t.request(*sent, b"License-Proxy-Peer: " + value, body=body)
    if "Age" in marked.headers:
        return "UNSAFE", f"answered {marked.status} from trust, Age {marked.headers['Age']}"
    return "safe", f"answered {marked.status} by the license server"


def _not_204(answer: Answer) -> tuple[str, str]:
    return ("UNSAFE" if answer.status == 204 else "safe"), f"answered {answer.status or 'nothing'}"


class Outage:
    """Attacks on the trust cache: ``prime`` while the license server is up, ``check`` in an
    outage.  Each check is (name, function)."""

    FLEET = 10

    def __init__(self, t: Target, max_entries: int, interval: float) -> None:
        self.t, self.max_entries, self.interval = t, max_entries, interval
        self.primed: dict[str, Answer] = {}

    #: name -> (the request primed and asked for again, the same with one thing changed)
    PAIRS = {
        "credential named in Connection keys the answer": (
            ("GET", b"k-connection", b"Authorization: Token attacker-a", b"Connection: Authorization"),
            ("GET", b"k-connection", b"Authorization: Token attacker-a"),
        ),
        "X-Api-Key in the key": (("GET", b"k-api-key", b"X-Api-Key: key-a"),
                                 ("GET", b"k-api-key", b"X-Api-Key: key-b")),
        "Cookie in the key": (("GET", b"k-cookie", b"Cookie: s=a"), ("GET", b"k-cookie", b"Cookie: s=b")),
        "method in the key": (("GET", b"k-method"), ("PUT", b"k-method")),
        "Vary: X-Tenant in the key": (("GET", b"k-vary", b"X-Tenant: tenant-a"),
                                      ("GET", b"k-vary", b"X-Tenant: tenant-b")),
    }

    def prime(self) -> None:
        t = self.t
        # Twice, a check-in interval apart, as a fleet does: kept through the flood.
        for round in range(2):
            for primed, _ in self.PAIRS.values():
                self.primed[primed[1].decode()] = t.request(*primed)
            self.primed["set-cookie"] = t.request("GET", b"k-set-cookie")
            for n in range(self.FLEET):
                t.request("GET", b"fleet-%d" % n, b"Authorization: Token fleet")
            since = t.last_checkin()
            while not round and t.last_checkin() < since + self.interval + 0.1:
                time.sleep(0.1)
        for n in range(2 * self.max_entries):
            for _ in range(2):
                t.request("GET", b"flood-%d" % n, b"Authorization: Token flood")

    def checks(self) -> dict[str, Callable[[], tuple[str, str]]]:
        checks = {name: lambda pair=pair: self._pair(*pair) for name, pair in self.PAIRS.items()}
        checks["Vary: X-Tenant in the key"] = self._vary
        checks["Set-Cookie replayed from the cache"] = self._set_cookie
        checks[f"flood of {2 * self.max_entries} requests each sent twice"] = self._fleet
        return checks

    def _pair(self, primed, changed) -> tuple[str, str]:
        """``changed`` must not get ``primed``'s answer; ``primed`` (less the Connection
        trick) must, else the check proved nothing."""
        attack = self.t.request(*changed)
        if attack.status == 200:
            return "UNSAFE", "answered 200 from trust"
        # What the license server was sent: no header the request named in Connection.
        sent = primed[:2] if any(h.startswith(b"Connection:") for h in primed[2:]) else primed
        control = self.t.request(*sent)
        if control.status != 200:
            return "not tested", f"the primed request itself answered {control.status}"
        return "safe", f"answered {attack.status}; the primed request 200 from trust"

    def _vary(self) -> tuple[str, str]:
        if "x-tenant" not in (self.primed["k-vary"].headers.get("Vary") or "").lower():
            return "not tested", "the license server's answer has no Vary: X-Tenant"
        return self._pair(*self.PAIRS["Vary: X-Tenant in the key"])

    def _set_cookie(self) -> tuple[str, str]:
        if self.primed["set-cookie"].headers.get("Set-Cookie") is None:
            return "not tested", "the license server set no cookie"
        answer = self.t.request("GET", b"k-set-cookie")
        if answer.status != 200:
            return "not tested", f"answered {answer.status}: the answer was not in the cache"
        cookie = answer.headers.get("Set-Cookie")
        return ("safe" if cookie is None else "UNSAFE"), f"cached answer's Set-Cookie: {cookie}"

    def _fleet(self) -> tuple[str, str]:
        served = [
            self.t.request("GET", b"fleet-%d" % n, b"Authorization: Token fleet").status
            for n in range(self.FLEET)
        ]
        kept = served.count(200)
        verdict = "safe" if kept == self.FLEET else "UNSAFE"
        return verdict, f"{kept} of the fleet's {self.FLEET} answers served from trust"


def run(attacks: dict[str, Callable[[], tuple[str, str]]], out) -> list[str]:
    verdicts = []
    for name, attack in attacks.items():
        verdict, detail = attack()
        verdicts.append(verdict)
        print(f"{name}: {verdict} ({detail})", file=out, flush=True)
    return verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8443)
    parser.add_argument("--status-port", type=int, default=8080)
    parser.add_argument("--base-url", default="/")
    parser.add_argument("--ca", help="CA file verifying the proxy (default: not verified)")
    parser.add_argument("--plain", action="store_true", help="the listener is plain HTTP")
    parser.add_argument("--outage", action="store_true", help="also the trust cache attacks")
    parser.add_argument("--max-entries", type=int, default=10_000)
    parser.add_argument("--checkin-interval", type=float, default=60.0)
    args = parser.parse_args(argv)
    target = Target(args)
    verdicts = run({**door_attacks(target), **peer_attacks(target)}, sys.stdout)
    if args.outage:
        outage = Outage(target, args.max_entries, args.checkin_interval)
        outage.prime()
        print("# primed: stop the license server, then press Enter", file=sys.stderr, flush=True)
        sys.stdin.readline()
        verdicts += run(outage.checks(), sys.stdout)
    return 1 if "UNSAFE" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
