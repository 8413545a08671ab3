"""Search a machine's files and process table for a secret, in plain text and in base64.

A registry password can be stored as itself, inside a basic-auth header (`user:password`), or
inside an `X-Registry-Auth` value (base64url of a JSON object that holds it). Any base64 text
that encodes the password contains, at one of three alignments, a run of characters that depends
on the password's bits alone: `needles` returns those runs (both alphabets), so one byte search
finds every encoding without knowing what surrounded the password.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable
from pathlib import Path


def needles(secret: str) -> list[bytes]:
    raw = secret.encode()
    found = {raw}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * offset + raw)
            start = -(-8 * offset // 6)  # ceil
            stop = 8 * (offset + len(raw)) // 6
            found.add(encoded[start:stop].rstrip(b"="))
    return sorted(found)


def files_containing(roots: Iterable[Path], secret: str) -> list[str]:
    """Regular files under `roots` (symlinks not followed) holding any needle of `secret`."""
    wanted = needles(secret)
    hits = []
    for root in roots:
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                    with open(path, "rb") as handle:
                        data = handle.read()
                except OSError:
                    continue  # gone meanwhile, or a file the kernel will not let root read
                if any(needle in data for needle in wanted):
                    hits.append(path)
    return hits


def processes_showing(secret: str) -> list[str]:
    """`/proc/PID/{cmdline,environ}` of live processes that hold a needle of `secret`."""
    wanted = needles(secret)
    hits = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{part}").read_bytes()
            except OSError:
                continue  # ended meanwhile
            if any(needle in data for needle in wanted):
                hits.append(f"/proc/{pid}/{part}")
    return hits
