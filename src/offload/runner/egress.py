"""Runner-side egress rules for sandboxed engines: what a session's containers may connect to.

Each rootless engine reaches the outside world through its network helper (pasta, or
slirp4netns), which runs in the runner's own network namespace as that environment's identity
(a host uid of the runner's range): every outbound connection of a sandbox is an ordinary
socket of a process owned by such a uid. So one
`-m owner --uid-owner LO-HI` jump in the runner's OUTPUT chain catches all of them, and nothing
in a sandbox can change the rules (it holds no capability in the runner's namespace).

The chain (`OFFLOAD-EGRESS` by default; IPv4 through `iptables`, IPv6 through `ip6tables`):

1. packets of connections that are already tracked (`ESTABLISHED,RELATED`) go on: replies of a
   connection someone else opened to a sandbox's socket (a published port), and connections
   that were allowed when they started;
2. DNS (udp and tcp port 53) to exactly the nameservers of the runner's resolv.conf, read at
   install time: the helper forwards the sandbox's 10.0.2.3 there, and they are often private
   or loopback addresses; with no `nameserver` line, 127.0.0.1 and ::1 (glibc's default);
3. the runner's own services for sandboxes (its pull cache: one address and tcp port each);
4. never, refused whatever the operator says: the runner's own addresses (`addrtype LOCAL`),
   loopback, link-local and cloud metadata (169.254.0.0/16, fe80::/10, fd00:ec2::254),
   0.0.0.0/8, multicast and reserved (224.0.0.0/4, 240.0.0.0/4, ff00::/8), and the unspecified
   and IPv4-mapped IPv6 ranges;
5. the operator's allowed ranges (`OFFLOAD_RUNNER_EGRESS_ALLOW`, e.g. a LAN registry) go on;
6. private ranges are refused: 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7;
7. everything else goes on (back to OUTPUT, whose other rules still apply).

"Goes on" is RETURN, not ACCEPT: the chain only ever refuses, so the host's own firewall keeps
the last word on what it lets out. The jump is the first rule of OUTPUT, so no earlier ACCEPT
lets a sandbox past it. Refusals are at once, never a silent drop (second chain
`<chain>-REJECT`): TCP gets a reset, so connect() fails with "connection refused"; other
protocols get icmp(6) port-unreachable, and as the packet is refused on its way out of this
host, a UDP send() already fails (EPERM) in the helper (libslirp answers a failed send with an
ICMP unreachable to the container, read in its udp.c; tests/integration/runner/test_egress.py
measures what a container sees).

`install` and `uninstall` each run as one `iptables-restore --noflush` transaction per family:
a re-install (new allowed ranges, a restarted runner) never leaves a moment without rules, and
stale jumps to the chain (a previous runner's uid range) are replaced by the one jump. The rules
follow resolv.conf as it was at install time: re-install after the runner's nameservers change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from offload.core.errors import EnvironmentError_

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Family = Literal[4, 6]

DEFAULT_CHAIN = "OFFLOAD-EGRESS"
REJECT_SUFFIX = "-REJECT"
SETTING = "OFFLOAD_RUNNER_EGRESS_ALLOW"
IPTABLES_TIMEOUT_S = 30.0
# iptables chain names are at most 28 characters; the reject chain adds REJECT_SUFFIX.
_CHAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,20}")
_BUILTIN_CHAINS = {"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"}
MAX_UID = 2**32 - 2


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Refused before the operator's ranges, so no setting can open them (the runner's own addresses
# are matched by `addrtype LOCAL` as well, whatever range they are in).
NEVER: dict[Family, tuple[IPNetwork, ...]] = {
    4: _nets("127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"),
    6: _nets("::1/128", "::/128", "fe80::/10", "fd00:ec2::254/128", "ff00::/8", "::ffff:0:0/96"),
}
# Refused after the operator's ranges: an allowed range opens (part of) one of these.
PRIVATE: dict[Family, tuple[IPNetwork, ...]] = {
    4: _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"),
    6: _nets("fc00::/7"),
}
_NEVER_WHY = {
    "127.0.0.0/8": "the runner's loopback",
    "::1/128": "the runner's loopback",
    "169.254.0.0/16": "link-local addresses and cloud metadata (169.254.169.254)",
    "fe80::/10": "link-local addresses",
    "fd00:ec2::254/128": "cloud metadata (AWS IPv6)",
    "0.0.0.0/8": "'this network'",
    "::/128": "the unspecified address",
    "224.0.0.0/4": "multicast",
    "ff00::/8": "multicast",
    "240.0.0.0/4": "reserved addresses and broadcast",
    "::ffff:0:0/96": "IPv4-mapped addresses",
}
# glibc (resolv.conf(5)) and libslirp fall back to a resolver on the local machine.
DEFAULT_NAMESERVERS: tuple[IPAddress, ...] = (
    ipaddress.IPv4Address("127.0.0.1"),
    ipaddress.IPv6Address("::1"),
)


class EgressError(EnvironmentError_):
    """The runner could not set up (or read back) its egress rules."""


def _never_overlap(net: IPNetwork) -> IPNetwork | None:
    for never in NEVER[_family(net)]:
        if net.overlaps(never):
            return never
    return None


def _family(net: IPNetwork | IPAddress) -> Family:
    return 4 if net.version == 4 else 6


def parse_allowed_ranges(value: str) -> tuple[IPNetwork, ...]:
    """The operator's allowed private ranges from a comma-separated CIDR list (`SETTING`).

    Empty entries are ignored and duplicates dropped. Raises ValueError naming the bad entry and
    the fix: for text that is no CIDR, for host bits set (`10.1.2.3/24`), and for a range that
    touches what is never allowed (loopback, link-local/metadata, multicast, reserved).
    """
    found: list[IPNetwork] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry:
            continue
        net = _parse_range(entry)
        if net not in found:
            found.append(net)
    return tuple(found)


def _parse_range(entry: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(entry)
    except ValueError:
        try:
            loose = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(
                f"{SETTING}: {entry!r} is not an IP range. "
                f"Fix: give comma-separated CIDRs, e.g. {SETTING}=10.213.7.0/24,fd12:3456::/48"
            ) from None
        host = entry.split("/")[0]
        raise ValueError(
            f"{SETTING}: {entry!r} has host bits set. Fix: write the range as {loose} "
            f"(or {host}/{loose.max_prefixlen} for that one host)"
        ) from None
    never = _never_overlap(net)
    if never is not None:
        raise ValueError(
            f"{SETTING}: {entry!r} includes {never} ({_NEVER_WHY[str(never)]}), which sandboxes "
            "may never reach, whatever the setting; the runner's own addresses are refused too. "
            "Fix: list only the private ranges sandboxes need (e.g. a LAN registry's "
            "10.213.7.0/24) and remove this entry"
        )
    return net


def read_nameservers(text: str) -> tuple[IPAddress, ...]:
    """The `nameserver` addresses of a resolv.conf, in order (zone ids dropped).

    With none, the local machine's resolver (DEFAULT_NAMESERVERS), as glibc and libslirp do.
    """
    found: list[IPAddress] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1].split("%", 1)[0])
        except ValueError:
            continue  # glibc ignores it too
        if address not in found:
            found.append(address)
    return tuple(found) or DEFAULT_NAMESERVERS


def _check_uid_range(uids: range) -> None:
    if uids.step != 1 or len(uids) == 0:
        raise EgressError(
            f"The egress rules need a non-empty, contiguous uid range, not {uids!r}.",
            "Configure the runner's identities as one contiguous range of host uids.",
        )
    if uids.start < 1 or uids.stop - 1 > MAX_UID:
        raise EgressError(
            f"The uid range {uids.start}..{uids.stop - 1} for egress rules includes root or "
            "is beyond the largest uid; the runner itself would be filtered.",
            "Give the sandboxes' identities unprivileged uids of their own (e.g. from 1900000).",
        )


def _check_chain(chain: str) -> None:
    if not _CHAIN_NAME.fullmatch(chain) or chain.upper() in _BUILTIN_CHAINS:
        raise EgressError(
            f"{chain!r} cannot name the egress chain.",
            "Use letters, digits, '-' and '_', at most 21 characters, starting with a letter, "
            "and not a built-in chain (e.g. OFFLOAD-EGRESS).",
        )


@dataclass(frozen=True)
class EgressPolicy:
    """The rules for one uid range, as `iptables -S` prints them (pure: nothing is run here)."""

    uid_range: range
    allow: tuple[IPNetwork, ...] = ()
    nameservers: tuple[IPAddress, ...] = ()
    chain: str = DEFAULT_CHAIN
    services: tuple[tuple[IPAddress, int], ...] = ()  # the runner's, for sandboxes (tcp)

    def __post_init__(self) -> None:
        _check_uid_range(self.uid_range)
        _check_chain(self.chain)
        for net in self.allow:
            never = _never_overlap(net)
            if never is not None:
                raise EgressError(
                    f"The allowed egress range {net} includes {never} "
                    f"({_NEVER_WHY[str(never)]}), which sandboxes may never reach.",
                    f"Remove {net} from {SETTING}; list only the private ranges sandboxes need.",
                )

    @property
    def reject_chain(self) -> str:
        return self.chain + REJECT_SUFFIX

    def jump(self) -> str:
        """The one OUTPUT rule that sends the range's packets through the chain."""
        lo, hi = self.uid_range.start, self.uid_range.stop - 1
        uids = str(lo) if lo == hi else f"{lo}-{hi}"
        return f"-A OUTPUT -m owner --uid-owner {uids} -j {self.chain}"

    def rules(self, family: Family) -> list[str]:
        """The chain's and the reject chain's rules, in order (`-A CHAIN …` lines)."""
        c, rej, bits = self.chain, self.reject_chain, 32 if family == 4 else 128
        lines = [f"-A {c} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"]
        for ns in self.nameservers:
            if ns.version == family:
                for proto in ("udp", "tcp"):
                    lines.append(
                        f"-A {c} -d {ns}/{bits} -p {proto} -m {proto} --dport 53 -j RETURN"
                    )
        for address, port in self.services:
            if address.version == family:
                lines.append(f"-A {c} -d {address}/{bits} -p tcp -m tcp --dport {port} -j RETURN")
        lines.append(f"-A {c} -m addrtype --dst-type LOCAL -j {rej}")
        lines += [f"-A {c} -d {_cidr(net)} -j {rej}" for net in NEVER[family]]
        lines += [f"-A {c} -d {_cidr(n)} -j RETURN" for n in self.allow if n.version == family]
        lines += [f"-A {c} -d {_cidr(net)} -j {rej}" for net in PRIVATE[family]]
        unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
        lines += [
            f"-A {rej} -p tcp -j REJECT --reject-with tcp-reset",
            f"-A {rej} -j REJECT --reject-with {unreachable}",
        ]
        return lines

    def install_script(self, family: Family, stale_jumps: Iterable[str] = ()) -> str:
        """iptables-restore --noflush input: (re)create both chains and the one jump, at once."""
        c, rej = self.chain, self.reject_chain
        lines = ["*filter", f":{c} - [0:0]", f":{rej} - [0:0]", f"-F {c}", f"-F {rej}"]
        lines += self.rules(family)
        lines += [_delete(jump) for jump in stale_jumps]
        lines.append(self.jump().replace("-A OUTPUT", "-I OUTPUT 1", 1))
        lines.append("COMMIT")
        return "\n".join(lines) + "\n"


def _cidr(net: IPNetwork) -> str:
    """`net` as `iptables -S` prints it (IPv4-mapped IPv6 with a dotted quad)."""
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        return f"::ffff:{net.network_address.ipv4_mapped}/{net.prefixlen}"
    return str(net)


def _delete(rule: str) -> str:
    return "-D" + rule.removeprefix("-A")


def _jumps_to(chain: str, listing: Sequence[str]) -> list[str]:
    """The OUTPUT rules of an `iptables -S` listing that jump (or go) to `chain`."""
    found = []
    for line in listing:
        if not line.startswith("-A OUTPUT "):
            continue
        words = shlex.split(line)
        if any(a in ("-j", "-g") and b == chain for a, b in zip(words, words[1:], strict=False)):
            found.append(line)
    return found


def _in_chain(chain: str, listing: Sequence[str]) -> list[str]:
    return [line for line in listing if line == f"-N {chain}" or line.startswith(f"-A {chain} ")]


def uninstall_script(chain: str, listing: Sequence[str]) -> str | None:
    """iptables-restore --noflush input that removes the jumps and both chains; None: nothing."""
    chains = [c for c in (chain, chain + REJECT_SUFFIX) if f"-N {c}" in listing]
    jumps = _jumps_to(chain, listing) + _jumps_to(chain + REJECT_SUFFIX, listing)
    if not chains and not jumps:
        return None
    lines = ["*filter", *(_delete(j) for j in jumps)]
    lines += [f"-F {c}" for c in chains] + [f"-X {c}" for c in chains]
    return "\n".join([*lines, "COMMIT"]) + "\n"


class EgressFirewall:
    """Installs an `EgressPolicy` for both IP families with the iptables CLI tools (root)."""

    def __init__(
        self,
        uid_range: range,
        allow: Sequence[str | IPNetwork] = (),
        chain: str = DEFAULT_CHAIN,
        resolv_conf: Path = Path("/etc/resolv.conf"),
        services: Sequence[tuple[str, int]] = (),
    ) -> None:
        _check_uid_range(uid_range)
        _check_chain(chain)
        self.uid_range = uid_range
        nets: list[IPNetwork] = []
        for item in allow:
            try:
                parsed = parse_allowed_ranges(item) if isinstance(item, str) else (item,)
            except ValueError as exc:
                message, _, fix = str(exc).partition(" Fix: ")
                raise EgressError(message, fix) from None
            nets += [net for net in parsed if net not in nets]
        self.allow = tuple(nets)
        self.chain = chain
        self.resolv_conf = resolv_conf
        self.services = tuple((ipaddress.ip_address(a), p) for a, p in services)

    async def policy(self) -> EgressPolicy:
        """The policy as it would be installed now (resolv.conf read afresh)."""
        try:
            text = await asyncio.to_thread(self.resolv_conf.read_text)
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise EgressError(
                f"Could not read {self.resolv_conf} for the sandboxes' nameservers: {exc}",
                "Make the runner's resolv.conf readable by the runner.",
            ) from None
        return EgressPolicy(
            self.uid_range, self.allow, read_nameservers(text), self.chain, self.services
        )

    async def install(self) -> EgressPolicy:
        """(Re)create the chains and the one jump for the range, for IPv4 and IPv6; idempotent.

        Any other jump to the chain (a previous runner's range) is removed in the same
        transaction. Returns the policy installed.
        """
        policy = await self.policy()
        for family in (4, 6):
            listing = await _listing(family)
            script = policy.install_script(family, _jumps_to(self.chain, listing))
            await _restore(family, script)
        return policy

    async def uninstall(self) -> None:
        """Remove the jump(s) and both chains, for both families; nothing there is fine."""
        for family in (4, 6):
            script = uninstall_script(self.chain, await _listing(family))
            if script is not None:
                await _restore(family, script)

    async def describe(self) -> list[str]:
        """The live rules as runnable command lines (`iptables -A …`), for `offload diagnose`."""
        lines = []
        for family in (4, 6):
            listing = await _listing(family)
            tool = _tool(family)
            found = _jumps_to(self.chain, listing)
            found += _in_chain(self.chain, listing) + _in_chain(self.chain + REJECT_SUFFIX, listing)
            lines += [f"{tool} {line}" for line in found]
        return lines


def _tool(family: Family) -> str:
    return "iptables" if family == 4 else "ip6tables"


async def _run(args: Sequence[str], stdin: str | None = None) -> tuple[int, str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise EgressError(
            f"`{args[0]}` is not installed: the runner needs it for the sandboxes' egress rules.",
            "Install it on the runner host (`apt-get install iptables`).",
        ) from None
    try:
        async with asyncio.timeout(IPTABLES_TIMEOUT_S):
            out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise EgressError(
            f"`{' '.join(args)}` did not finish within {IPTABLES_TIMEOUT_S:.0f}s.",
            "Check what holds the xtables lock (`fuser /run/xtables.lock`) and try again.",
        ) from None
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def _listing(family: Family) -> list[str]:
    """`iptables -S` of the filter table (all chains), one rule a line."""
    tool = _tool(family)
    rc, out, err = await _run([tool, "-w", "-t", "filter", "-S"])
    if rc != 0:
        raise EgressError(
            f"`{tool} -S` failed: {err.strip() or out.strip()}",
            "Run the runner as root on a kernel with netfilter (and IPv6) support.",
        )
    return out.splitlines()


async def _restore(family: Family, script: str) -> None:
    tool = f"{_tool(family)}-restore"
    rc, out, err = await _run([tool, "-w", "--noflush"], stdin=script)
    if rc != 0:
        raise EgressError(
            f"`{tool} --noflush` refused the egress rules: {err.strip() or out.strip()}",
            "Run the runner as root; the kernel needs the owner, addrtype, conntrack and REJECT "
            "netfilter modules.",
        )
