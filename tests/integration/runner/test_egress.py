"""Egress rules for sandboxed engines (`offload.runner.egress`), with real iptables and sockets.

The pure part (rule lines, the operator's CIDR setting, resolv.conf) is tested first and needs
nothing. The rest installs the rules for a uid range of this module's own (far from any range
a runner uses) under a chain of its own, and connects as uids inside and outside that range
(`setpriv`) to servers that all live on this host: on loopback, on the host's own addresses, and
in two network namespaces this module creates, reached over veth pairs:

- "internet": 198.51.100.x and 2001:db8:51:x::1 (documentation ranges, nothing real);
- "lan": a private LAN host 10.213.7.1 (and fd7e:213:7::1), a nameserver 10.213.53.53 and the
  metadata address 169.254.169.254, all inside that namespace.

No packet goes anywhere else: the servers' answers prove where a connection went, and a client
that is let through answers the same for uids inside and outside the range, so the difference
is the rules. Every check is bounded (the client gives up after CLIENT_TIMEOUT_S, reported as
"timeout", which is never what a refusal looks like).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.runner import egress
from offload.runner.egress import (
    NEVER,
    EgressError,
    EgressFirewall,
    EgressPolicy,
    Family,
    parse_allowed_ranges,
    read_nameservers,
    uninstall_script,
)
from offload.runner.netns_connect import socket_in_netns

# ---------------------------------------------------------------------------------------------
# Pure: rule lines, the setting, resolv.conf
# ---------------------------------------------------------------------------------------------

RANGE = range(1900000, 1900064)
NS4 = ipaddress.ip_address("10.255.255.53")
NS6 = ipaddress.ip_address("fd00::53")


def test_rules_order_dns_then_never_then_allowed_then_private() -> None:
    policy = EgressPolicy(RANGE, parse_allowed_ranges("10.213.7.0/24"), (NS4, NS6), "EG")
    rules = policy.rules(4)
    assert policy.jump() == "-A OUTPUT -m owner --uid-owner 1900000-1900063 -j EG"
    assert rules[0] == "-A EG -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    dns = rules.index("-A EG -d 10.255.255.53/32 -p udp -m udp --dport 53 -j RETURN")
    assert rules[dns + 1] == "-A EG -d 10.255.255.53/32 -p tcp -m tcp --dport 53 -j RETURN"
    local = rules.index("-A EG -m addrtype --dst-type LOCAL -j EG-REJECT")
    never = [rules.index(f"-A EG -d {net} -j EG-REJECT") for net in NEVER[4]]
    allowed = rules.index("-A EG -d 10.213.7.0/24 -j RETURN")
    private = rules.index("-A EG -d 10.0.0.0/8 -j EG-REJECT")
    assert dns < local < min(never) and max(never) < allowed < private
    for cidr in ("127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"):
        assert f"-A EG -d {cidr} -j EG-REJECT" in rules
    for cidr in ("172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"):
        assert rules.index(f"-A EG -d {cidr} -j EG-REJECT") > allowed
    assert rules[-2:] == [
        "-A EG-REJECT -p tcp -j REJECT --reject-with tcp-reset",
        "-A EG-REJECT -j REJECT --reject-with icmp-port-unreachable",
    ]
    assert not any("fd00::53" in rule for rule in rules)


def test_rules_ipv6() -> None:
    policy = EgressPolicy(RANGE, parse_allowed_ranges("fd12:3456::/48,10.0.0.0/8"), (NS4, NS6))
    rules = policy.rules(6)
    c, rej = "OFFLOAD-EGRESS", "OFFLOAD-EGRESS-REJECT"
    assert f"-A {c} -d fd00::53/128 -p udp -m udp --dport 53 -j RETURN" in rules
    assert not any("10.255.255.53" in rule or "10.0.0.0" in rule for rule in rules)
    for cidr in ("::1/128", "fe80::/10", "fd00:ec2::254/128", "ff00::/8", "::ffff:0.0.0.0/96"):
        assert rules.index(f"-A {c} -d {cidr} -j {rej}") < rules.index(
            f"-A {c} -d fd12:3456::/48 -j RETURN"
        )
    assert rules.index(f"-A {c} -d fd12:3456::/48 -j RETURN") < rules.index(
        f"-A {c} -d fc00::/7 -j {rej}"
    )
    assert rules[-1] == f"-A {rej} -j REJECT --reject-with icmp6-port-unreachable"


def test_single_uid_and_install_script() -> None:
    policy = EgressPolicy(range(1900005, 1900006), chain="EG")
    assert policy.jump() == "-A OUTPUT -m owner --uid-owner 1900005 -j EG"
    stale = "-A OUTPUT -m owner --uid-owner 1800000-1800063 -j EG"
    script = policy.install_script(4, [stale]).splitlines()
    assert script[:5] == ["*filter", ":EG - [0:0]", ":EG-REJECT - [0:0]", "-F EG", "-F EG-REJECT"]
    assert script[-3:] == [
        "-D OUTPUT -m owner --uid-owner 1800000-1800063 -j EG",
        "-I OUTPUT 1 -m owner --uid-owner 1900005 -j EG",
        "COMMIT",
    ]


def test_uninstall_script_only_what_is_there() -> None:
    assert uninstall_script("EG", ["-P OUTPUT ACCEPT", "-N EGX", "-A OUTPUT -j EGX"]) is None
    listing = [
        "-P OUTPUT ACCEPT",
        "-N EG",
        "-N EG-REJECT",
        "-A OUTPUT -m owner --uid-owner 1-2 -j EG",
        "-A OUTPUT -d 10.0.0.1/32 -j ACCEPT",
        "-A EG -d 10.0.0.0/8 -j EG-REJECT",
    ]
    assert uninstall_script("EG", listing) == (
        "*filter\n-D OUTPUT -m owner --uid-owner 1-2 -j EG\n"
        "-F EG\n-F EG-REJECT\n-X EG\n-X EG-REJECT\nCOMMIT\n"
    )


@pytest.mark.parametrize(
    "bad",
    [
        range(0, 10),  # root would be filtered
        range(5, 5),
        range(10, 20, 2),
        range(2**32 - 5, 2**32),
    ],
)
def test_uid_range_refused(bad: range) -> None:
    with pytest.raises(EgressError):
        EgressPolicy(bad)
    with pytest.raises(EgressError):
        EgressFirewall(bad)


@pytest.mark.parametrize("chain", ["", "OUTPUT", "has space", "A" * 22, "1ABC", "x;rm"])
def test_chain_name_refused(chain: str) -> None:
    with pytest.raises(EgressError):
        EgressPolicy(RANGE, chain=chain)


def test_allowed_ranges_parsed() -> None:
    assert parse_allowed_ranges("") == ()
    assert parse_allowed_ranges(" , ") == ()
    assert parse_allowed_ranges(" 10.213.7.0/24, 192.168.5.7 ,fd12::/48,10.213.7.0/24") == (
        ipaddress.ip_network("10.213.7.0/24"),
        ipaddress.ip_network("192.168.5.7/32"),
        ipaddress.ip_network("fd12::/48"),
    )
    assert parse_allowed_ranges("FD12::/48") == (ipaddress.ip_network("fd12::/48"),)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("registry.lan", "is not an IP range"),
        ("10.213.7.0/33", "is not an IP range"),
        ("10.213.7.1/24", "write the range as 10.213.7.0/24"),
        ("127.0.0.0/8", "127.0.0.0/8 (the runner's loopback)"),
        ("127.0.0.53", "the runner's loopback"),
        ("0.0.0.0/0", "includes 127.0.0.0/8"),
        ("169.254.169.254", "cloud metadata"),
        ("::1", "the runner's loopback"),
        ("::/0", "includes ::1/128"),
        ("fe80::/64", "link-local"),
        ("fd00:ec2::254", "cloud metadata"),
        ("fd00::/8", "cloud metadata"),
        ("::ffff:10.0.0.0/104", "IPv4-mapped"),
        ("239.1.1.1", "multicast"),
        ("255.255.255.255", "reserved"),
    ],
)
def test_allowed_ranges_refused(entry: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_allowed_ranges(f"10.1.0.0/16,{entry}")
    message = str(caught.value)
    assert egress.SETTING in message and repr(entry) in message and says in message
    assert "Fix:" in message
    with pytest.raises(EgressError) as from_firewall:
        EgressFirewall(RANGE, allow=[entry])
    assert repr(entry) in from_firewall.value.message and from_firewall.value.fix


def test_policy_refuses_a_never_range_given_as_network() -> None:
    with pytest.raises(EgressError, match="169.254.0.0/16"):
        EgressPolicy(RANGE, (ipaddress.ip_network("169.254.0.0/16"),))


networks = st.one_of(
    st.builds(
        lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)


@given(networks)
def test_any_range_is_accepted_exactly_when_it_avoids_never(net: egress.IPNetwork) -> None:
    touches_never = any(net.overlaps(n) for n in NEVER[4 if net.version == 4 else 6])
    try:
        parsed = parse_allowed_ranges(str(net))
    except ValueError as exc:
        assert touches_never and repr(str(net)) in str(exc) and "Fix:" in str(exc)
    else:
        assert not touches_never and parsed == (net,)
        policy = EgressPolicy(RANGE, parsed)
        assert f"-d {egress._cidr(net)} -j RETURN" in "\n".join(policy.rules(net.version))


@given(
    st.sampled_from(["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"]), st.data()
)
def test_every_private_subrange_can_be_allowed(private: str, data: st.DataObject) -> None:
    base = ipaddress.IPv4Network(private)
    prefix = data.draw(st.integers(base.prefixlen, 32))
    offset = data.draw(st.integers(0, base.num_addresses - 1))
    sub = ipaddress.IPv4Network((int(base.network_address) + offset, prefix), strict=False)
    assert parse_allowed_ranges(str(sub)) == (sub,)


def test_nameservers_from_resolv_conf() -> None:
    text = (
        "# generated\n; old comment\nsearch lan\nnameserver 10.255.255.53\n"
        "nameserver fe80::1%eth0\nnameserver not-an-address\nnameserver 10.255.255.53\n"
        "nameserver   127.0.0.53  \noptions edns0\n"
    )
    assert read_nameservers(text) == (
        ipaddress.ip_address("10.255.255.53"),
        ipaddress.ip_address("fe80::1"),
        ipaddress.ip_address("127.0.0.53"),
    )
    assert read_nameservers("search lan\n") == egress.DEFAULT_NAMESERVERS


# ---------------------------------------------------------------------------------------------
# Real rules, real sockets
# ---------------------------------------------------------------------------------------------

CLIENT_TIMEOUT_S = 10.0
PORT = 8080  # inside this module's namespaces, where nothing else listens
NAMESERVER = "10.213.53.53"
METADATA = "169.254.169.254"
LAN = "10.213.7.1"
LAN6 = "fd7e:213:7::1"
LAN_HOST_SIDE = "10.213.7.2"

# Run as the client's uid: report what a connection (or a UDP exchange) came to.
CLIENT = """
import errno, socket, sys
host, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(family, kind)
s.settimeout(float(sys.argv[4]))
try:
    s.connect((host, port))
    if proto == "udp":
        s.send(b"ping")
    print("ok:" + s.recv(100).decode())
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print("error:" + errno.errorcode.get(exc.errno or 0, str(exc)))
"""

# Run as an in-range uid: a server on 127.0.0.1 (as a sandbox's published port would be).
UID_SERVER = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
conn, _ = s.accept()
conn.sendall(b"from-sandbox")
conn.close()
"""

needs_root = pytest.mark.skipif(
    os.geteuid() != 0
    or not all(shutil.which(t) for t in ("iptables", "ip6tables", "ip", "setpriv")),
    reason="needs root, iptables, ip6tables, iproute2 and setpriv",
)


def sh(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")


def serve_tcp(sock: socket.socket, reply: bytes) -> None:
    sock.setblocking(True)
    sock.listen()
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        with conn:
            conn.sendall(reply)


def serve_udp_echo(sock: socket.socket) -> None:
    sock.setblocking(True)
    while True:
        try:
            data, peer = sock.recvfrom(512)
            if peer is None:  # shut down
                return
            sock.sendto(b"dns:" + data, peer)
        except OSError:
            return


@dataclass
class Lab:
    suffix: str
    inet: str  # the "internet" server's address
    inet6: str
    host_side6: str  # the host's own address on the internet veth
    uids: range
    outside_uid: int
    resolv_conf: Path
    loopback_port: int
    loopback6_port: int
    host_port: int  # a server of the host on 0.0.0.0 / :: (a control plane)
    host_address: str  # the host's own non-loopback address


def _server(
    sockets: list[socket.socket], family: int, kind: int, addr: tuple[str, int], netns: str | None
) -> socket.socket:
    sock = socket_in_netns(netns, kind, family) if netns else socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(addr)
    sockets.append(sock)
    target = serve_tcp if kind == socket.SOCK_STREAM else serve_udp_echo
    reply = f"{netns or 'host'}:{addr[0]}".encode()
    args = (sock, reply) if kind == socket.SOCK_STREAM else (sock,)
    threading.Thread(target=target, args=args, daemon=True).start()
    return sock


def _host_address() -> str:
    """The host's own global IPv4 address outside this module's veths (its uplink's)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    for link in json.loads(out or "[]"):
        if link["ifname"].startswith("oe"):
            continue
        for info in link.get("addr_info", []):
            return str(info["local"])
    return LAN_HOST_SIDE  # still one of the host's own addresses


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    sfx = uuid.uuid4().hex[:6]
    ns_inet, ns_lan = f"ote-{sfx}-inet", f"ote-{sfx}-lan"
    net = random.randrange(64) * 4  # a /30 of 198.51.100.0/24 of its own
    inet, inet_host = f"198.51.100.{net + 1}", f"198.51.100.{net + 2}"
    sub6 = random.randrange(1, 0xFFFF)
    inet6, inet6_host = f"2001:db8:51:{sub6:x}::1", f"2001:db8:51:{sub6:x}::2"
    base = 2_900_000 + random.randrange(1000) * 64  # far from the runners' ranges
    sockets: list[socket.socket] = []
    setup = [
        ("ip", "netns", "add", ns_inet),
        ("ip", "netns", "add", ns_lan),
        ("ip", "link", "add", f"oe{sfx}i", "type", "veth", "peer", "name", f"oe{sfx}ip"),
        ("ip", "link", "add", f"oe{sfx}l", "type", "veth", "peer", "name", f"oe{sfx}lp"),
        ("ip", "link", "set", f"oe{sfx}ip", "netns", ns_inet, "name", "eth0"),
        ("ip", "link", "set", f"oe{sfx}lp", "netns", ns_lan, "name", "eth0"),
        ("ip", "addr", "add", f"{inet_host}/30", "dev", f"oe{sfx}i"),
        ("ip", "addr", "add", f"{inet6_host}/64", "dev", f"oe{sfx}i", "nodad"),
        ("ip", "addr", "add", f"{LAN_HOST_SIDE}/24", "dev", f"oe{sfx}l"),
        ("ip", "addr", "add", "fd7e:213:7::2/64", "dev", f"oe{sfx}l", "nodad"),
        ("ip", "link", "set", f"oe{sfx}i", "up"),
        ("ip", "link", "set", f"oe{sfx}l", "up"),
        ("ip", "-n", ns_inet, "link", "set", "lo", "up"),
        ("ip", "-n", ns_inet, "addr", "add", f"{inet}/30", "dev", "eth0"),
        ("ip", "-n", ns_inet, "addr", "add", f"{inet6}/64", "dev", "eth0", "nodad"),
        ("ip", "-n", ns_inet, "link", "set", "eth0", "up"),
        ("ip", "-n", ns_lan, "link", "set", "lo", "up"),
        ("ip", "-n", ns_lan, "addr", "add", f"{LAN}/24", "dev", "eth0"),
        ("ip", "-n", ns_lan, "addr", "add", f"{NAMESERVER}/32", "dev", "eth0"),
        ("ip", "-n", ns_lan, "addr", "add", f"{METADATA}/32", "dev", "eth0"),
        ("ip", "-n", ns_lan, "addr", "add", f"{LAN6}/64", "dev", "eth0", "nodad"),
        ("ip", "-n", ns_lan, "link", "set", "eth0", "up"),
        ("ip", "route", "add", f"{NAMESERVER}/32", "via", LAN, "dev", f"oe{sfx}l"),
        ("ip", "route", "add", f"{METADATA}/32", "via", LAN, "dev", f"oe{sfx}l"),
    ]
    try:
        try:
            for args in setup:
                sh(*args)
        except RuntimeError as exc:
            pytest.skip(f"cannot build the test networks here: {exc}")
        v4, v6, tcp, udp = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM, socket.SOCK_DGRAM
        _server(sockets, v4, tcp, (inet, PORT), ns_inet)
        _server(sockets, v6, tcp, (inet6, PORT), ns_inet)
        for address in (LAN, METADATA, NAMESERVER):
            _server(sockets, v4, tcp, (address, PORT), ns_lan)
        _server(sockets, v6, tcp, (LAN6, PORT), ns_lan)
        _server(sockets, v4, udp, (NAMESERVER, 53), ns_lan)
        _server(sockets, v4, tcp, (NAMESERVER, 53), ns_lan)
        loopback = _server(sockets, v4, tcp, ("127.0.0.1", 0), None)
        loopback6 = _server(sockets, v6, tcp, ("::1", 0), None)
        anywhere = _server(sockets, v4, tcp, ("0.0.0.0", 0), None)
        port = anywhere.getsockname()[1]
        _server(sockets, v6, tcp, ("::", port), None)
        resolv = tmp_path_factory.mktemp("egress") / "resolv.conf"
        resolv.write_text(f"search test\nnameserver {NAMESERVER}\n")
        yield Lab(
            suffix=sfx,
            inet=inet,
            inet6=inet6,
            host_side6=inet6_host,
            uids=range(base, base + 16),
            outside_uid=base + 100,
            resolv_conf=resolv,
            loopback_port=loopback.getsockname()[1],
            loopback6_port=loopback6.getsockname()[1],
            host_port=port,
            host_address=_host_address(),
        )
    finally:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for args in (
            ("ip", "route", "del", f"{NAMESERVER}/32"),
            ("ip", "route", "del", f"{METADATA}/32"),
            ("ip", "link", "del", f"oe{sfx}i"),
            ("ip", "link", "del", f"oe{sfx}l"),
            ("ip", "netns", "del", ns_inet),
            ("ip", "netns", "del", ns_lan),
        ):
            subprocess.run(args, capture_output=True)


MakeFirewall = Callable[..., EgressFirewall]


@pytest.fixture
def chain() -> str:
    return f"OT-EGR-{uuid.uuid4().hex[:6].upper()}"


@pytest.fixture
def make_firewall(lab: Lab, chain: str) -> Iterator[MakeFirewall]:
    """Firewalls on this test's own chain; the chain and its jumps are gone after the test."""

    def make(
        *,
        allow: tuple[str, ...] = (),
        uids: range | None = None,
        services: tuple[tuple[str, int], ...] = (),
    ) -> EgressFirewall:
        return EgressFirewall(
            uids or lab.uids, allow, chain=chain, resolv_conf=lab.resolv_conf, services=services
        )

    yield make
    asyncio.run(make().uninstall())
    assert chain not in live_rules(4) + live_rules(6), "a test left egress rules behind"


def live_rules(family: int) -> str:
    tool = "iptables" if family == 4 else "ip6tables"
    return subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True).stdout


async def probe(uid: int, host: str, port: int, proto: str = "tcp") -> str:
    """What a connection from `uid` to host:port comes to: ok:<server>, refused, timeout, …"""
    proc = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        CLIENT,
        host,
        str(port),
        proto,
        str(CLIENT_TIMEOUT_S),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(CLIENT_TIMEOUT_S + 20):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode().strip()


async def reachable_by_both(lab: Lab, host: str, port: int, proto: str = "tcp") -> str:
    inside = await probe(lab.uids.start, host, port, proto)
    outside = await probe(lab.outside_uid, host, port, proto)
    assert inside.startswith("ok:"), f"{host}:{port}/{proto} for an in-range uid: {inside}"
    assert outside == inside
    return inside


async def refused_inside_only(lab: Lab, host: str, port: int, proto: str = "tcp") -> None:
    """Refused at once for in-range uids, answered for others.

    TCP: the reset makes connect() fail with ECONNREFUSED. UDP: the datagram is dropped on its
    way out, so send() itself fails with EPERM (slirp4netns turns that into an ICMP unreachable
    for the container); a timeout would mean it was silently lost instead.
    """
    refusal = {"tcp": {"refused"}, "udp": {"refused", "error:EPERM"}}[proto]
    for uid in (lab.uids.start, lab.uids.stop - 1):
        got = await probe(uid, host, port, proto)
        assert got in refusal, f"{host}:{port}/{proto} for uid {uid}: {got}"
    outside = await probe(lab.outside_uid, host, port, proto)
    assert outside.startswith("ok:"), f"{host}:{port} for an outside uid: {outside}"


@needs_root
async def test_everything_reachable_before_install(lab: Lab) -> None:
    # The baseline: without rules, the in-range uid reaches every server of the lab.
    for host, port in [
        ("127.0.0.1", lab.loopback_port),
        (lab.host_address, lab.host_port),
        (lab.inet, PORT),
        (LAN, PORT),
        (METADATA, PORT),
    ]:
        await reachable_by_both(lab, host, port)


@needs_root
async def test_loopback_refused_fast_for_sandbox_uids(
    lab: Lab, make_firewall: MakeFirewall
) -> None:
    await make_firewall().install()
    await refused_inside_only(lab, "127.0.0.1", lab.loopback_port)
    await refused_inside_only(lab, "127.0.0.2", lab.host_port)  # the whole of 127/8


@needs_root
async def test_loopback_ipv6_refused(lab: Lab, make_firewall: MakeFirewall) -> None:
    await make_firewall().install()
    await refused_inside_only(lab, "::1", lab.loopback6_port)


@needs_root
async def test_host_own_address_refused(lab: Lab, make_firewall: MakeFirewall) -> None:
    # A control plane listening on 0.0.0.0 / :: of the runner host.
    await make_firewall().install()
    await refused_inside_only(lab, lab.host_address, lab.host_port)
    await refused_inside_only(lab, LAN_HOST_SIDE, lab.host_port)  # inside an allowed LAN too
    await refused_inside_only(lab, lab.host_side6, lab.host_port)


@needs_root
async def test_a_runner_service_opens_its_address_and_port_only(
    lab: Lab, make_firewall: MakeFirewall
) -> None:
    """The pull cache: one address and port of the runner's own, and nothing else of it."""
    await make_firewall(services=((lab.host_address, lab.host_port),)).install()
    await reachable_by_both(lab, lab.host_address, lab.host_port)
    await refused_inside_only(lab, LAN_HOST_SIDE, lab.host_port)  # same port, other address
    await refused_inside_only(lab, lab.host_side6, lab.host_port)
    await refused_inside_only(lab, "127.0.0.1", lab.loopback_port)


def test_service_rule_comes_before_the_refusal_of_local_addresses() -> None:
    policy = EgressPolicy(RANGE, chain="EG", services=((ipaddress.ip_address("192.0.2.2"), 5055),))
    rules = policy.rules(4)
    service = rules.index("-A EG -d 192.0.2.2/32 -p tcp -m tcp --dport 5055 -j RETURN")
    assert service < rules.index("-A EG -m addrtype --dst-type LOCAL -j EG-REJECT")
    assert not any("192.0.2.2" in rule for rule in policy.rules(6))


@needs_root
async def test_internet_reachable(lab: Lab, make_firewall: MakeFirewall) -> None:
    await make_firewall().install()
    assert await reachable_by_both(lab, lab.inet, PORT) == f"ok:ote-{lab.suffix}-inet:{lab.inet}"
    await reachable_by_both(lab, lab.inet6, PORT)


@needs_root
async def test_private_lan_refused_until_allowed(lab: Lab, make_firewall: MakeFirewall) -> None:
    await make_firewall().install()
    await refused_inside_only(lab, LAN, PORT)
    await refused_inside_only(lab, LAN6, PORT)

    await make_firewall(allow=("10.213.7.0/24",)).install()
    assert await reachable_by_both(lab, LAN, PORT) == f"ok:ote-{lab.suffix}-lan:{LAN}"
    await refused_inside_only(lab, LAN6, PORT)  # only what was allowed
    await refused_inside_only(lab, LAN_HOST_SIDE, lab.host_port)  # never the runner itself

    await make_firewall(allow=("fd7e:213:7::/64",)).install()
    await reachable_by_both(lab, LAN6, PORT)
    await refused_inside_only(lab, LAN, PORT)  # the re-install dropped 10.213.7.0/24


@needs_root
async def test_metadata_refused(lab: Lab, make_firewall: MakeFirewall) -> None:
    await make_firewall(allow=("10.213.7.0/24",)).install()
    await refused_inside_only(lab, METADATA, PORT)


@needs_root
async def test_dns_to_the_nameserver_allowed(lab: Lab, make_firewall: MakeFirewall) -> None:
    await make_firewall().install()
    assert await reachable_by_both(lab, NAMESERVER, 53, "udp") == "ok:dns:ping"
    await reachable_by_both(lab, NAMESERVER, 53, "tcp")
    # Only port 53: the same (private) host is refused on any other port.
    await refused_inside_only(lab, NAMESERVER, PORT)


@needs_root
async def test_udp_refused_at_once(lab: Lab, make_firewall: MakeFirewall) -> None:
    lab.resolv_conf.write_text("nameserver 198.51.100.250\n")  # another nameserver now
    try:
        await make_firewall().install()
        await refused_inside_only(lab, NAMESERVER, 53, "udp")
    finally:
        lab.resolv_conf.write_text(f"nameserver {NAMESERVER}\n")


@needs_root
async def test_replies_of_a_sandbox_server_go_out(lab: Lab, make_firewall: MakeFirewall) -> None:
    # A published port: the runner connects to a socket an in-range uid listens on (127.0.0.1);
    # that socket's replies are tracked, so the rules let them through.
    await make_firewall().install()
    uid = lab.uids.start
    server = await asyncio.create_subprocess_exec(
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        UID_SERVER,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdout is not None
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            port = int(await server.stdout.readline())
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.read() == b"from-sandbox"
            writer.close()
            await server.wait()
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()


@needs_root
async def test_install_is_idempotent(lab: Lab, make_firewall: MakeFirewall, chain: str) -> None:
    firewall = make_firewall(allow=("10.213.7.0/24",))
    policy = await firewall.install()
    first = await firewall.describe()
    await firewall.install()
    assert await firewall.describe() == first
    families: tuple[tuple[Family, str], ...] = ((4, "iptables"), (6, "ip6tables"))
    for family, tool in families:
        listing = live_rules(family).splitlines()
        assert listing.count(policy.jump()) == 1
        assert [line for line in listing if line.startswith(f"-A {chain}")] == policy.rules(family)
        assert f"{tool} {policy.jump()}" in first


@needs_root
async def test_install_replaces_a_previous_runners_jump(
    lab: Lab, make_firewall: MakeFirewall, chain: str
) -> None:
    old = await make_firewall(uids=range(lab.uids.start, lab.uids.start + 4)).install()
    new = await make_firewall().install()
    for family in (4, 6):
        jumps = [line for line in live_rules(family).splitlines() if line.endswith(f"-j {chain}")]
        assert jumps == [new.jump()] and old.jump() != new.jump()
    await refused_inside_only(lab, "127.0.0.1", lab.loopback_port)


@needs_root
async def test_uninstall_leaves_nothing(lab: Lab, make_firewall: MakeFirewall, chain: str) -> None:
    firewall = make_firewall()
    await firewall.install()
    assert chain in live_rules(4) and chain in live_rules(6)
    await firewall.uninstall()
    await firewall.uninstall()  # idempotent
    assert chain not in live_rules(4) and chain not in live_rules(6)
    assert await firewall.describe() == []
    await reachable_by_both(lab, "127.0.0.1", lab.loopback_port)


@needs_root
async def test_missing_iptables_is_a_clear_error(
    lab: Lab, make_firewall: MakeFirewall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without iptables
    with pytest.raises(EgressError) as caught:
        await make_firewall().install()
    assert "apt-get install iptables" in str(caught.value)
