"""`offload` with the pause of every full garbage collection written to a file, for
bench/load.py's `--server-command`:

    .venv/bin/python -m bench.load --scenario sqlite \
        --server-command ".venv/bin/python bench/gc_pause_wrapper.py"

Each line of `$GC_PAUSE_LOG` (default: gc-pauses.txt in the working directory) is the wall time
and the milliseconds of one generation-2 collection, during which every request in flight waits.
`bench/results/*-ab-*.gc-pauses.txt` are its output for the A/B runs of `gc.freeze` in
`offload server` (docs/operations.md).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from typing import Any

_log = open(os.environ.get("GC_PAUSE_LOG", "gc-pauses.txt"), "a", buffering=1)  # noqa: SIM115
_started = [0.0]


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    if info["generation"] != 2:
        return
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    pause_ms = 1000 * (time.perf_counter() - _started[0])
    _log.write(f"{time.time():.1f} gen2 {pause_ms:.1f} ms collected {info['collected']}\n")


if __name__ == "__main__":
    gc.callbacks.append(_on_collection)
    from offload.cli.entry import main

    sys.argv[0] = "offload"
    sys.exit(main())
