"""Find and remove the mounts an environment's engine left under its directories.

dockerd and containerd mount overlay roots, shm, nsfs bind mounts and private bind mounts under
the data-root and exec-root; a directory tree with live mounts cannot be removed.  Blocking: run
these in a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: str | None = None) -> list[str]:
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    return [_unescape(line.split()[4]) for line in mountinfo.splitlines() if line.strip()]


def mounts_under(roots: list[Path], mountinfo: str | None = None) -> list[str]:
    """Mount points at or below any of `roots`, deepest first."""
    prefixes = [str(r).rstrip("/") for r in roots]
    found = {
        m for m in mount_points(mountinfo) if any(m == p or m.startswith(p + "/") for p in prefixes)
    }
    return sorted(found, key=lambda m: (m.count("/"), m), reverse=True)


def _umount(target: str, flags: int) -> int:
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


MS_BIND = 4096
MS_PRIVATE = 1 << 18


def bind(source: Path, target: Path) -> None:
    """Bind-mount `source` on `target`, private: nothing mounted later under either
    propagates to the other."""
    for src, flags in ((source, MS_BIND), (None, MS_PRIVATE)):
        rc = _libc.mount(
            os.fsencode(str(src)) if src else None, os.fsencode(str(target)), None, flags, None
        )
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def unmount_under(roots: list[Path]) -> list[str]:
    """Unmount everything below `roots` (deepest first; lazy as fallback); return what stays."""
    # Mounts can stack on one point: repeat until a pass finds nothing more to do.
    for _ in range(8):
        targets = mounts_under(roots)
        if not targets:
            return []
        for target in targets:
            err = _umount(target, 0)
            if err in (0, errno.EINVAL, errno.ENOENT):
                continue  # done, or no longer a mount point
            err = _umount(target, MNT_DETACH)
            if err not in (0, errno.EINVAL, errno.ENOENT):
                log.warning("could not unmount %s: %s", target, os.strerror(err))
    return mounts_under(roots)
