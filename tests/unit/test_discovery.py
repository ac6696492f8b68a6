"""Unit tests of ``discovery``: the peers a DNS name gives, this instance excepted."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from license_proxy.discovery import Discovery

OWN = b"own-id"


def url(address: str) -> str:
    return f"https://{address}:8443/v1/"


class DiscoveryTests(SynchronousTestCase):
    def setUp(self):
        self.addresses: list = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        self.ids = {url("10.0.0.1"): OWN, url("10.0.0.2"): b"b", url("10.0.0.3"): b"c"}
        self.probed: list[str] = []
        self.used: list[list[str]] = []
        self.discovery = Discovery(
            self.resolve, self.identify, self.used.append, OWN, "peers.ns.svc", 8443, "/v1/"
        )

    def resolve(self, name: str) -> Deferred:
        assert name == "peers.ns.svc"
        if isinstance(self.addresses, Exception):
            return fail(self.addresses)
        return succeed(list(self.addresses))

    def identify(self, target: str) -> Deferred:
        self.probed.append(target)
        return succeed(self.ids.get(target))

    def refresh(self) -> None:
        self.successResultOf(Deferred.fromCoroutine(self.discovery.refresh()))

    def test_every_address_but_this_instances_is_a_peer(self):
        self.refresh()
        self.assertEqual(self.used, [[url("10.0.0.2"), url("10.0.0.3")]])

    def test_an_address_is_probed_once_while_it_resolves(self):
        self.refresh()
        self.refresh()
        self.assertEqual(sorted(self.probed), sorted(self.ids))
        self.assertEqual(len(self.used), 1)  # told only when the peers change

    def test_pods_that_come_and_go_are_picked_up(self):
        self.refresh()
        self.addresses = ["10.0.0.1", "10.0.0.3", "10.0.0.4"]
        self.ids[url("10.0.0.4")] = b"d"
        self.refresh()
        self.assertEqual(self.used[-1], [url("10.0.0.3"), url("10.0.0.4")])
        # An address that comes back is probed again: it may be another pod now.
        self.addresses.append("10.0.0.2")
        self.ids[url("10.0.0.2")] = b"b2"
        self.refresh()
        self.assertEqual(self.probed.count(url("10.0.0.2")), 2)
        self.assertEqual(self.used[-1], [url("10.0.0.3"), url("10.0.0.4"), url("10.0.0.2")])

    def test_an_address_not_answering_yet_is_probed_again(self):
        del self.ids[url("10.0.0.3")]  # a pod still starting
        self.refresh()
        self.assertEqual(self.used, [[url("10.0.0.2")]])
        self.ids[url("10.0.0.3")] = b"c"
        self.refresh()
        self.assertEqual(self.used[-1], [url("10.0.0.2"), url("10.0.0.3")])

    def test_this_instance_is_known_by_its_id_not_its_address(self):
        self.ids = {url("10.0.0.1"): b"b", url("10.0.0.2"): b"c", url("10.0.0.3"): OWN}
        self.refresh()
        self.assertEqual(self.used, [[url("10.0.0.1"), url("10.0.0.2")]])

    def test_a_failed_or_empty_lookup_keeps_the_peers(self):
        self.refresh()
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for failure in (DNSLookupError("peers.ns.svc"), []):
            self.addresses = failure
            self.refresh()
        self.assertEqual(len(self.used), 1)
        lines = [e for e in events if "did not resolve" in e.get("log_format", "")]
        self.assertEqual(len(lines), 1)  # one line per transition

    def test_the_first_lookup_tells_even_no_peer(self):
        """A pull at start waits for the first lookup's peers (``Peers.pull``): a lone pod's
        is told at once, so it does not wait for the pull's bound."""
        self.addresses = ["10.0.0.1"]  # this instance alone
        self.refresh()
        self.assertEqual(self.used, [[]])
        self.refresh()
        self.assertEqual(self.used, [[]])  # then only when the peers change

    def test_an_ipv6_address_is_bracketed(self):
        self.addresses = ["fd00::2"]
        self.ids = {"https://[fd00::2]:8443/v1/": b"b"}
        self.refresh()
        self.assertEqual(self.used, [["https://[fd00::2]:8443/v1/"]])
