"""Import asyncssh without its search for liboqs (for the agent, whose import `start` waits for).

At import, asyncssh looks for liboqs (the sntrup761 key exchange) with `ctypes.util.find_library`
under two names; on Linux each look runs `ldconfig -p`, then `gcc` and `ld` when a compiler is
installed: about 90 ms of a 2-core laptop, on the critical path of `docker offload start`.
Offload's SSH endpoint and agent both speak mlkem768x25519 and curve25519 (cryptography's), so
the agent offers no sntrup761 and never needs liboqs.
"""

from __future__ import annotations

import sys

LIBOQS_NAMES = ("oqs", "liboqs")


def import_asyncssh() -> None:
    """Import asyncssh now, answering its liboqs lookups "not found" without searching."""
    if "asyncssh" in sys.modules:
        return
    import ctypes.util

    find_library = ctypes.util.find_library

    def without_liboqs(name: str) -> str | None:
        return None if name in LIBOQS_NAMES else find_library(name)

    ctypes.util.find_library = without_liboqs
    try:
        import asyncssh  # noqa: F401
    finally:
        ctypes.util.find_library = find_library
