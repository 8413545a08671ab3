"""Names for the sandboxes' network namespaces (`ip netns attach`), and a finder for unused leftovers."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from offload.core.errors import EnvironmentError_

NETNS_DIR = Path("/var/run/netns")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


async def run_ip(*args: str) -> tuple[int, str]:
    """Run `ip ARGS`; return its exit status and combined output."""
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def attach(name: str, pid: int) -> None:
    """Name the network namespace of process `pid` (made by rootlesskit) for port forwards."""
    rc, out = await run_ip("netns", "attach", name, str(pid))
    if rc != 0:
        raise EnvironmentError_(
            f"Could not name the sandbox's network namespace {name}: {out}",
            "Run the runner as root with iproute2 installed (`apt-get install iproute2`).",
        )


async def delete(name: str) -> None:
    """Delete the namespace; a missing one is fine (idempotent)."""
    if not netns_path(name).exists():
        return
    rc, out = await run_ip("netns", "del", name)
    if rc != 0 and netns_path(name).exists():
        raise EnvironmentError_(
            f"Could not delete network namespace {name}: {out}",
            f"Check what still uses it (`ip netns pids {name}`) and delete it by hand.",
        )


def names(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def inode(name: str) -> int:
    return os.stat(netns_path(name)).st_ino


def unused(prefix: str, min_age_s: float) -> list[str]:
    """Namespaces named `prefix*` that no process is in and that are older than `min_age_s`.

    The age guard keeps a namespace that another driver has just created, and whose dockerd is
    not started yet, from being taken for a leftover.  Blocking: run it in a thread.
    """
    candidates: dict[int, str] = {}
    now = time.time()
    for name in names(prefix):
        try:
            st = os.stat(netns_path(name))
        except FileNotFoundError:
            continue
        if now - st.st_ctime >= min_age_s:
            candidates[st.st_ino] = name
    if candidates:
        for ino in _inodes_in_use():
            candidates.pop(ino, None)
    return sorted(candidates.values())


def _inodes_in_use() -> set[int]:
    used: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            used.add(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
        except OSError:
            pass  # exited meanwhile, or a kernel thread
    return used
