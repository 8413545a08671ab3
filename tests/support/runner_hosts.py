"""Runner hosts on one machine: network namespaces on a LAN of the test's own.

`lan(count)` makes a bridge in the host namespace (the laptops' and the control plane's side, at
10.77.N.1/24 for an N no route of this host touches) and `count` network namespaces, each with a
veth pair whose outer end is a port of the bridge and whose inner end holds the namespace's own
address (10.77.N.2, 10.77.N.3, …): hosts on one LAN that the host namespace reaches by its
connected route and that reach 10.77.N.1. Nothing is routed out of this machine.

Names are the test run's own (`orh-<hex>-<i>`, bridge `orhb<hex>`, veths `orh<hex><i>h/n`, all
at most 15 characters; never the runner's own `off-` prefix), removed with everything in them
when the context ends, also on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from tests.support.internet import Netns, _ip, host_routes

LAN_BLOCK = "10.77.0.0/16"  # one /24 of it per LAN


@dataclass
class Lan:
    bridge: str
    network: ipaddress.IPv4Network
    hosts: list[Netns]

    @property
    def host_side(self) -> str:
        """The host namespace's address on the LAN (where the control plane listens)."""
        return str(self.network.network_address + 1)


def _free_network() -> ipaddress.IPv4Network:
    routes = host_routes()
    candidates = [
        net
        for net in ipaddress.IPv4Network(LAN_BLOCK).subnets(new_prefix=24)
        if not any(net.overlaps(route) for route in routes)
    ]
    if not candidates:
        raise RuntimeError(f"every /24 of {LAN_BLOCK} is routed on this host already")
    return random.choice(candidates)  # another test run's LAN is routed, so it is never chosen


@contextlib.contextmanager
def lan(count: int) -> Iterator[Lan]:
    suffix = uuid.uuid4().hex[:6]
    network = _free_network()
    bridge = f"orhb{suffix}"
    hosts: list[Netns] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{network.network_address + 1}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i in range(count):
            inner = f"{network.network_address + 2 + i}/24"
            ns = Netns(
                f"orh-{suffix}-{i}",
                f"orh{suffix}{i}h",
                [(inner, f"{network.network_address + 1}/24")],
            )
            peer = f"orh{suffix}{i}n"
            _ip("netns", "add", ns.name)
            hosts.append(ns)
            _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns.name)
            _ip("link", "set", ns.host_if, "master", bridge)
            _ip("link", "set", ns.host_if, "up")
            _ip("-n", ns.name, "addr", "add", inner, "dev", peer)
            _ip("-n", ns.name, "link", "set", peer, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
        yield Lan(bridge, network, hosts)
    finally:
        for ns in reversed(hosts):
            ns.delete()
        with contextlib.suppress(Exception):
            _ip("link", "del", bridge)
