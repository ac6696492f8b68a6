"""
The peers found by DNS (``[peers] name``): on Kubernetes, a headless Service whose name resolves
to the address of every pod behind it, so pods that come and go are peers without a restart.

The name is resolved every ``INTERVAL`` seconds. Each address not yet known is probed (the
peers' probe, with this instance's peer certificate): an address answering with this instance's
own id (``Peers.instance``, new at each start) is this instance, never asked, and recognised
whatever its address looks like from inside the pod; one answering with another id is a peer,
reached at that address on this instance's own port and ``base_url`` and verified against the
name (``tls.contexts``); one not answering yet (a pod still starting) is probed again next time.
An address gone from the name is no longer a peer. A lookup that fails or finds nothing keeps
the peers found before: a DNS hiccup must not cost the peers during an outage.
"""

from __future__ import annotations

from typing import Callable, Optional

from attrs import define, field
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

INTERVAL = 5.0
"""Seconds between lookups of ``[peers] name``: a new pod is a peer within one, plus its probe."""


@define
class Discovery:
    """``name``'s addresses, less this instance's, told to ``use`` as peer URLs when they change."""

    _resolve: Callable[[str], Deferred]  # name -> its addresses, [] if none
    _identify: Callable[[str], Deferred]  # URL -> the instance id answering there, or None
    _use: Callable[[list[str]], None]  # the peers' URLs, from now on
    _own: bytes  # this instance's id
    name: str
    _port: int
    _base_url: str
    _ids: dict = field(factory=dict, init=False)  # address -> id, once one answered
    # Their URLs, as last told to ``use``; None before the first lookup (which always tells:
    # a pull at start waits for it, ``Peers.pull``).
    _peers: Optional[list] = field(default=None, init=False)
    _failing: bool = field(default=False, init=False)

    log = Logger()

    async def refresh(self) -> None:
        """One lookup, and the probes of the addresses it found that are not known yet."""
        try:
            addresses = list(dict.fromkeys(await self._resolve(self.name)))
        except Exception as e:  # whatever the resolver raises: the next lookup may work
            addresses, reason = [], str(e)
        else:
            reason = "no address"
        if not addresses:
            if not self._failing:
                self._failing = True
                self.log.warn(
                    "peers: {name} did not resolve ({reason}); keeping the peers found before",
                    name=self.name, reason=reason,
                )
            return
        self._failing = False
        for gone in set(self._ids) - set(addresses):
            del self._ids[gone]
        unknown = [a for a in addresses if a not in self._ids]
        found = await gatherResults([self._identify(self._url(a)) for a in unknown])
        for address, instance in zip(unknown, found):
            if instance is not None:
                self._ids[address] = instance
        peers = [self._url(a) for a in addresses if self._ids.get(a) not in (None, self._own)]
        if peers != self._peers:
            self._peers = peers
            self.log.info(
                "peers: {name} names {count} peer(s) now: {urls}",
                name=self.name, count=len(peers), urls=", ".join(peers) or "none",
            )
            self._use(peers)

    def _url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"https://{host}:{self._port}{self._base_url}"


def resolver(reactor) -> Callable[[str], Deferred]:
    """Addresses of a name by the reactor's resolver (getaddrinfo in a thread by default)."""

    def resolve(name: str) -> Deferred:
        receiver = _Addresses()
        reactor.nameResolver.resolveHostName(receiver, name)
        return receiver.done

    return resolve


@implementer(IResolutionReceiver)
@define
class _Addresses:
    done: Deferred = field(factory=Deferred)
    _found: list = field(factory=list)

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        self._found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self._found)
