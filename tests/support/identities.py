"""Identity ranges for test runners: one of its own for every runner a test starts.

A runner owns its range: at start and stop it kills whatever runs under it, and its egress
chain is named after it.  So each test runner claims a range no other test process on the
machine holds: an exclusive `flock` on `/run/offload-test-identities/<k>.lock`, kept for the
life of the test process (the kernel drops it when the process dies, however it dies).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

SUBID_COUNT = 65_536
TEST_CAPACITY = 8
TEST_BUILDER_SLOTS = 4
SLOTS = 16  # per range: capacity + builder slots fit
MAX_RANGES = 600  # 3,000,000 + 600 * 16 uids; 400,000,000 + 600 * 16 * 65,536 subordinate ids
CLAIMS = Path("/run/offload-test-identities")
_held: list[int] = []  # lock file descriptors: the claims of this process


def identity_overrides() -> dict[str, int]:
    """RunnerSettings fields: an identity range claimed for this process, and its capacity."""
    k = _claim()
    return {
        "identity_uid_base": 3_000_000 + k * SLOTS,
        "subid_base": 400_000_000 + k * SLOTS * SUBID_COUNT,
        "capacity": TEST_CAPACITY,
        "builder_slots": TEST_BUILDER_SLOTS,
    }


def runner_overrides() -> dict[str, int | bool]:
    """What every test runner gets: an identity range of its own (`identity_overrides`), and
    no pull cache unless a test asks for one (it fronts Docker Hub, which is not reachable
    here: tests/e2e/test_registries.py gives it a hub of its own)."""
    return {**identity_overrides(), "pull_cache": False}


def identity_env() -> dict[str, str]:
    """`runner_overrides` as OFFLOAD_RUNNER_* environment variables (for `offload up`)."""
    return {f"OFFLOAD_RUNNER_{key.upper()}": str(v) for key, v in runner_overrides().items()}


def _claim() -> int:
    CLAIMS.mkdir(parents=True, exist_ok=True)
    for k in range(MAX_RANGES):
        fd = os.open(CLAIMS / f"{k}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # another test process's, or one this process holds already
            continue
        _held.append(fd)
        return k
    raise RuntimeError(f"all {MAX_RANGES} test identity ranges are claimed")
