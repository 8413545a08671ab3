"""Identity ranges for test runners: one of its own for every runner a test starts.

A runner owns its range: at start and stop it kills whatever runs under it, and its egress
chain is named after it.  So each test runner gets a range apart from every other one in this
test process and, by the pid, from those of other test processes on the machine.
"""

from __future__ import annotations

import itertools
import os

SUBID_COUNT = 65_536
TEST_CAPACITY = 8
_SLOTS = itertools.count(os.getpid() % 20 * 32)


def identity_overrides() -> dict[str, int]:
    """RunnerSettings fields: a fresh identity range and the capacity it is sized for."""
    k = next(_SLOTS)
    return {
        "identity_uid_base": 3_000_000 + k * 16,
        "subid_base": 400_000_000 + k * TEST_CAPACITY * SUBID_COUNT,
        "capacity": TEST_CAPACITY,
    }


def identity_env() -> dict[str, str]:
    """The same as OFFLOAD_RUNNER_* environment variables (for `offload up`)."""
    return {f"OFFLOAD_RUNNER_{key.upper()}": str(v) for key, v in identity_overrides().items()}
