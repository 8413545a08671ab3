"""Change events of one directory tree, from watchfiles' Rust notifier (inotify on Linux).

`RustNotify` is used directly rather than through `watchfiles.awatch` for one reason: its
constructor returns once the watches are in place, so a sync can start watching *before* it
scans and miss nothing in between. Each watcher blocks one dedicated thread (not the shared
default executor, which many idle watchers would starve).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchfiles._rust_notify import RustNotify

log = logging.getLogger(__name__)

# Changes are handed over once nothing new arrived for STEP_MS, or after DEBOUNCE_MS at most:
# an editor's save lands in one batch and a single edit is visible within tens of ms.
DEBOUNCE_MS = 100
STEP_MS = 10


class TreeWatcher:
    """Calls `on_paths(set of relative paths)` on the event loop for every batch of changes."""

    def __init__(
        self,
        root: Path,
        on_paths: Callable[[set[str]], None],
        *,
        debounce_ms: int = DEBOUNCE_MS,
        step_ms: int = STEP_MS,
    ) -> None:
        self.root = Path(os.path.realpath(root))
        self._on_paths = on_paths
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._stop = threading.Event()
        self._notify: RustNotify | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Blocking (sets up the watches): call from a worker thread for big trees."""
        self._notify = RustNotify([str(self.root)], False, False, 50, True, True)

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering events to `loop` from a dedicated thread."""
        self._thread = threading.Thread(
            target=self._deliver, args=(loop,), name=f"offload-watch-{self.root.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._notify is not None
        prefix = str(self.root) + "/"
        while not self._stop.is_set():
            try:
                changes = self._notify.watch(self._debounce_ms, self._step_ms, 0, self._stop)
            except Exception:
                log.exception("watching %s failed", self.root)
                return
            if isinstance(changes, str):  # 'stop', 'signal' or 'timeout'
                if changes == "stop":
                    return
                continue
            paths = {p[len(prefix) :] for _, p in changes if p.startswith(prefix)}
            if paths:
                try:
                    loop.call_soon_threadsafe(self._on_paths, paths)
                except RuntimeError:  # the loop is closed: nobody listens any more
                    return
