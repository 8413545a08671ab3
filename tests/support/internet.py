"""Stand-ins for "the internet" and for a private LAN, all on this machine.

Each is a network namespace of the test's own with a veth pair to the host namespace (where the
runner and its sandboxes' network helpers run): addresses on the host side give the host a connected
route to the namespace, so no traffic ever leaves this machine.

- `internet()`: a namespace at 198.51.100.10/24 (TEST-NET-2; the host side is 198.51.100.1;
  TEST-NET-3's 203.0.113.10 where another test run holds TEST-NET-2): public, so the runner's egress rules let sandboxes reach it. Servers started in it with
  `Netns.spawn` stand for a registry and a package mirror.
- `private_lan()`: a namespace holding private addresses (e.g. 10.213.9.1/24, host side
  10.213.9.2/24), which sandboxes may reach only where `OFFLOAD_RUNNER_EGRESS_ALLOW` lists them.

Namespaces are named after the test run (`oinet-<hex>`), removed with everything started in
them when the context ends, also on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from offload.core.waiting import wait_until

# TEST-NET-2 first, TEST-NET-3 where another test run holds it: neither is ever routed out.
INTERNET_NETWORKS = ("198.51.100.0/24", "203.0.113.0/24")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def host_routes() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The destinations of the host namespace's IPv4 routes (main table)."""
    out = subprocess.run(
        ["ip", "-4", "route", "show"], check=True, capture_output=True, text=True
    ).stdout
    found: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for line in out.splitlines():
        dst = line.split()[0]
        if dst != "default":
            found.append(ipaddress.ip_network(dst, strict=False))
    return found


def tcp_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if a TCP connect from this (the host) namespace to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Netns:
    """A network namespace with one veth pair to the host namespace."""

    name: str
    host_if: str
    addresses: list[tuple[str, str]]  # (namespace side CIDR, host side CIDR)

    @property
    def address(self) -> str:
        """The namespace's first address."""
        return self.addresses[0][0].split("/")[0]

    @property
    def host_side(self) -> str:
        """The host's first address on the veth pair (a runner-local address)."""
        return self.addresses[0][1].split("/")[0]

    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def create(self) -> None:
        routes = host_routes()
        for _, host_side in self.addresses:
            net = ipaddress.ip_interface(host_side).network
            clash = [str(route) for route in routes if route.overlaps(net)]
            if clash:
                raise RuntimeError(
                    f"{net} is routed on this host already ({', '.join(clash)}: another test "
                    "run's namespace?): wait for that run to end"
                )
        peer = self.host_if[:-1] + "n"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.name)
        for inner, outer in self.addresses:
            _ip("addr", "add", outer, "dev", self.host_if)
            _ip("-n", self.name, "addr", "add", inner, "dev", peer)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "link", "set", peer, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def spawn(self, argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start argv inside the namespace (nsenter: /sys and cgroups stay as they are)."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                ["nsenter", f"--net={self.path}", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def delete(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        # Deleting the namespace destroys its end of the veth pair, and with it the host's.
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.host_if)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("netns", "del", self.name)


@contextlib.contextmanager
def namespace(prefix: str, addresses: list[tuple[str, str]]) -> Iterator[Netns]:
    suffix = uuid.uuid4().hex[:6]
    ns = Netns(f"{prefix}-{suffix}", f"{prefix[:4]}{suffix}h", addresses)
    try:
        ns.create()
        yield ns
    finally:
        ns.delete()


def internet() -> contextlib.AbstractContextManager[Netns]:
    """The namespace at .10 of the first TEST-NET block no route of this host touches (.1 is
    the host's side)."""
    return _internet_hosts(1)[0]


@contextlib.contextmanager
def internet_hosts(count: int) -> Iterator[list[Netns]]:
    """`count` hosts of the internet, each a namespace of its own in a TEST-NET block of its
    own (e.g. a public hub and a private registry)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(host) for host in _internet_hosts(count)]


def _internet_hosts(count: int) -> list[contextlib.AbstractContextManager[Netns]]:
    routes = host_routes()
    free = [
        ipaddress.ip_network(cidr)
        for cidr in INTERNET_NETWORKS
        if not any(ipaddress.ip_network(cidr).overlaps(route) for route in routes)
    ]
    if len(free) < count:
        raise RuntimeError(
            f"{count} test network(s) needed, {len(free)} of {', '.join(INTERNET_NETWORKS)} "
            "free: the others are routed on this host already (other test runs' namespaces?); "
            "wait for them to end"
        )
    return [
        namespace(
            "oinet",
            [
                (
                    f"{net.network_address + 10}/{net.prefixlen}",
                    f"{net.network_address + 1}/{net.prefixlen}",
                )
            ],
        )  # fmt: skip
        for net in free[:count]
    ]


def private_lan(pairs: Sequence[tuple[str, str]]) -> contextlib.AbstractContextManager[Netns]:
    """A namespace with private (inner, host side) CIDRs, e.g. ("10.213.9.1/24", "10.213.9.2/24")."""
    for inner, _ in pairs:
        if not ipaddress.ip_interface(inner).ip.is_private:
            raise ValueError(f"{inner} is not a private address")
    return namespace("oplan", list(pairs))


def http_server(ns: Netns, bind: str, port: int, directory: Path, log: Path) -> None:
    """python's http.server in `ns` on bind:port serving `directory`; waits until it answers.

    Its log (one line per request, with the client's address) is what tests read to know
    whether a request reached it.
    """
    process = ns.spawn(
        [
            sys.executable,
            "-u",
            "-m",
            "http.server",
            "--bind",
            bind,
            "--directory",
            str(directory),
            str(port),
        ],
        log,
    )
    host = "127.0.0.1" if bind == "0.0.0.0" else bind

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"http.server in {ns.name} exited: {log.read_text()}")
        return _probe_inside(ns, host, port)

    wait_until(up, 30, f"http.server on {bind}:{port} in {ns.name}", 0.1)


def _probe_inside(ns: Netns, host: str, port: int) -> bool:
    """A TCP connect made inside the namespace (so the host's routes play no part)."""
    probe = subprocess.run(
        [
            "nsenter",
            f"--net={ns.path}",
            sys.executable,
            "-c",
            "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)",
            host,
            str(port),
        ],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


def requests_logged(log: Path, path: str) -> list[str]:
    """The http.server log lines of GET requests for `path`."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if f'"GET {path} ' in line]
