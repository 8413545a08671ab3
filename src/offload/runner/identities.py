"""Unprivileged host identities for sandboxed environments: one per live environment.

Each environment's engine runs rootless under an identity of its own: a host account
`offload-<uid>` (uid = gid = `uid_base + N` for slot N) that is root inside the environment's user
namespace, plus a subordinate range of 65,536 ids (`subid_base + N * 65536`, in /etc/subuid and
/etc/subgid) for the users inside it.  No two live environments share an identity, and an
identity is handed out again only when nothing of its last environment remains: no process runs
under any of its ids.

Accounts and subordinate ranges are made with shadow's own tools (`groupadd`, `useradd`,
`usermod --add-subuids`), which `newuidmap` (used by rootlesskit) trusts.  Blocking: callers run
the account functions in a thread.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

from offload.core.errors import EnvironmentError_

log = logging.getLogger(__name__)

SUBID_COUNT = 65_536
ACCOUNT_PREFIX = "offload-"
SUBUID_FILE = Path("/etc/subuid")
SUBGID_FILE = Path("/etc/subgid")


@dataclass(frozen=True)
class Identity:
    slot: int
    uid: int  # root inside the sandbox; also its gid
    subid_start: int

    @property
    def name(self) -> str:
        return f"{ACCOUNT_PREFIX}{self.uid}"

    @property
    def gid(self) -> int:
        return self.uid

    @property
    def subids(self) -> range:
        return range(self.subid_start, self.subid_start + SUBID_COUNT)

    def owns(self, uid: int) -> bool:
        return uid == self.uid or uid in self.subids


@dataclass(frozen=True)
class IdentityRange:
    """Where the runner's identities live; derived from the settings alone."""

    uid_base: int
    subid_base: int
    count: int

    def identity(self, slot: int) -> Identity:
        if not 0 <= slot < self.count:
            raise ValueError(f"identity slot {slot} is outside 0..{self.count - 1}")
        return Identity(slot, self.uid_base + slot, self.subid_base + slot * SUBID_COUNT)

    @property
    def uids(self) -> range:
        """Every host uid an environment's processes can have, sandbox roots first."""
        return range(self.uid_base, self.uid_base + self.count)

    @property
    def subids(self) -> range:
        return range(self.subid_base, self.subid_base + self.count * SUBID_COUNT)

    def check(self) -> None:
        """The two ranges must not overlap each other (the settings say where they are)."""
        if self.uid_base < 1000 or self.subid_base < 1000:
            raise EnvironmentError_(
                "The runner's identity ranges must start above the system ids (>= 1000).",
                "Set OFFLOAD_RUNNER_IDENTITY_UID_BASE and OFFLOAD_RUNNER_SUBID_BASE higher.",
            )
        if _overlap(self.uids, self.subids):
            raise EnvironmentError_(
                f"The identity uids {_span(self.uids)} overlap the subordinate ids "
                f"{_span(self.subids)}.",
                "Set OFFLOAD_RUNNER_IDENTITY_UID_BASE and OFFLOAD_RUNNER_SUBID_BASE apart.",
            )
        if self.subids.stop > 2**31:
            raise EnvironmentError_(
                f"The subordinate ids {_span(self.subids)} go beyond 2^31.",
                "Lower OFFLOAD_RUNNER_SUBID_BASE or the runner capacity.",
            )


# ---- host accounts ----------------------------------------------------------------------------


def ensure_account(identity: Identity) -> None:
    """Create the identity's account and subordinate ranges if missing; refuse a clash."""
    _ensure_group(identity)
    _ensure_user(identity)
    for path, flag in ((SUBUID_FILE, "--add-subuids"), (SUBGID_FILE, "--add-subgids")):
        entries = read_subid_file(path)
        wanted = (identity.name, identity.subid_start, SUBID_COUNT)
        if wanted in entries:
            continue
        for name, start, count in entries:
            if name != identity.name and _overlap(range(start, start + count), identity.subids):
                raise EnvironmentError_(
                    f"{path} gives {name} the ids {start}-{start + count - 1}, which overlap "
                    f"the range Offload needs for {identity.name} ({_span(identity.subids)}).",
                    "Set OFFLOAD_RUNNER_SUBID_BASE to a free range.",
                )
        span = f"{identity.subid_start}-{identity.subids.stop - 1}"
        _run(["usermod", flag, span, identity.name])


def _ensure_group(identity: Identity) -> None:
    try:
        existing = grp.getgrgid(identity.gid)
    except KeyError:
        _run(["groupadd", "--system", "--gid", str(identity.gid), identity.name])
        return
    if existing.gr_name != identity.name:
        raise _clash(f"gid {identity.gid} belongs to group {existing.gr_name!r}")


def _ensure_user(identity: Identity) -> None:
    try:
        existing = pwd.getpwuid(identity.uid)
    except KeyError:
        _run([
            "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--uid", str(identity.uid),
            "--gid", str(identity.gid), identity.name,
        ])  # fmt: skip
        return
    if existing.pw_name != identity.name or existing.pw_gid != identity.gid:
        raise _clash(f"uid {identity.uid} belongs to {existing.pw_name!r}")


def _clash(what: str) -> EnvironmentError_:
    return EnvironmentError_(
        f"The runner's identity range is in use on this host: {what}.",
        "Set OFFLOAD_RUNNER_IDENTITY_UID_BASE to a free range of uids and gids.",
    )


def read_subid_file(path: Path) -> list[tuple[str, int, int]]:
    """`name:start:count` lines of /etc/subuid or /etc/subgid (malformed lines skipped)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            entries.append((parts[0], int(parts[1]), int(parts[2])))
    return entries


def _run(command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise EnvironmentError_(
            f"`{command[0]}` was not found.", "Install shadow's tools: `apt-get install passwd`."
        ) from None
    if done.returncode != 0:
        raise EnvironmentError_(
            f"`{' '.join(command)}` failed: {(done.stderr or done.stdout).strip()}",
            "Run the runner as root; check /etc/passwd, /etc/group, /etc/subuid and /etc/subgid.",
        )
    log.info("identities: %s", " ".join(command))


# ---- what remains of an identity --------------------------------------------------------------


def processes_of(identities: list[Identity]) -> list[int]:
    """Pids of every process whose real, effective or saved uid belongs to one of `identities`.

    The sandbox's own pid namespace hides nothing from here: /proc of the runner sees all."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        uids = _proc_uids(entry.name)
        if any(identity.owns(uid) for uid in uids for identity in identities):
            found.append(int(entry.name))
    return sorted(found)


def _proc_uids(pid: str) -> list[int]:
    """Real, effective and saved uid of a live process; [] for one that has exited (a zombie
    not yet reaped holds nothing but its pid)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                    return []
                if line.startswith("Uid:"):
                    return [int(v) for v in line.split()[1:4]]
    except (OSError, ValueError, IndexError):
        pass  # exited meanwhile
    return []


# ---- helpers ----------------------------------------------------------------------------------


def _overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def _span(ids: range) -> str:
    return f"{ids.start}-{ids.stop - 1}"


def remove_accounts(every: IdentityRange) -> list[str]:
    """Delete the range's accounts (userdel also drops their subordinate ranges), for an
    operator retiring a runner or a test cleaning up; refuses while any of them runs."""
    every_identity = [every.identity(slot) for slot in range(every.count)]
    running = processes_of(every_identity)
    if running:
        raise EnvironmentError_(
            f"Processes still run under the runner's identities: {running[:10]}.",
            "Stop the runner (it wipes every environment) before removing its accounts.",
        )
    removed = []
    for identity in every_identity:
        try:
            if pwd.getpwuid(identity.uid).pw_name != identity.name:
                continue
        except KeyError:
            continue
        _run(["userdel", identity.name])
        with contextlib.suppress(KeyError):
            if grp.getgrgid(identity.gid).gr_name == identity.name:
                _run(["groupdel", identity.name])
        removed.append(identity.name)
    return removed
