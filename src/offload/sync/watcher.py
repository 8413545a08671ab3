"""Change events of one synced tree, delivered as sets of relative paths to the event loop.

Two watchers, one interface (`start()` blocking until the watches are in place, `run(loop)`,
`stop()`):

- `TreeWatcher` (the laptop): watchfiles' Rust notifier, which also works on macOS. It is used
  through `RustNotify` directly rather than `awatch` because its constructor returns once the
  watches are set, so a sync can watch *before* it scans and miss nothing. notify follows
  symlinks in recursive mode (watchfiles 1.3 has no switch for it) and then reports a change
  under the link's path; events are mapped back to the real path inside the root, and events
  outside it are dropped.
- `SafeTreeWatcher` (the runner): inotify through `inotify_simple`, never following a symlink.
  A container can plant `ln -s / x` in its mount area; notify would then recursively watch the
  whole host. Here every directory is opened with the no-follow walk of `SafeRoot` and watched
  through `/proc/self/fd/N`, so only real directories inside the area are ever watched.

Each watcher blocks one dedicated thread (not the shared default executor, which many idle
watchers would starve).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify
from inotify_simple import flags as iflags
from watchfiles._rust_notify import RustNotify

from offload.sync.ignore import IgnoreRules
from offload.sync.paths import PathRefused, SafeRoot

log = logging.getLogger(__name__)

# Changes are handed over once nothing new arrived for STEP_MS, or after DEBOUNCE_MS at most:
# an editor's save lands in one batch and a single edit is visible within tens of ms.
DEBOUNCE_MS = 100
STEP_MS = 10
# How long an idle watch waits before it returns to look for `caught_up` callers (cheap: the
# Rust side sleeps; the event loop hears of it only while someone waits).
IDLE_CYCLE_MS = 20
FULL_RESCAN = ""  # delivered when events were lost: compare the whole tree

OnPaths = Callable[[set[str]], None]


class _ThreadedWatcher:
    def __init__(self, name: str, on_paths: OnPaths) -> None:
        self._name = name
        self._on_paths = on_paths
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start delivering events to `loop` from a dedicated thread."""
        self._loop = loop
        self._thread = threading.Thread(
            target=self._deliver, name=f"offload-watch-{self._name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def _emit(self, paths: set[str]) -> bool:
        return self._call(self._on_paths, paths)

    def _call(self, callback: Callable[..., None], *args: object) -> bool:
        """Run `callback(*args)` on the event loop, after what was handed over before."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody listens any more
            return False
        return True

    def _deliver(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


class TreeWatcher(_ThreadedWatcher):
    """The laptop's watcher (watchfiles)."""

    def __init__(
        self,
        root: Path,
        on_paths: OnPaths,
        *,
        debounce_ms: int = DEBOUNCE_MS,
        step_ms: int = STEP_MS,
        recursive: bool = True,
    ) -> None:
        super().__init__(Path(root).name, on_paths)
        self.root = os.path.realpath(root)
        self._recursive = recursive
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._notify: RustNotify | None = None
        self._cycles = 0  # watch() calls completed (the watcher thread writes it)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # event loop only
        self._waiting = threading.Event()

    async def caught_up(self) -> None:
        """Return once every change the system reported before this call has been handed over.

        Edits land in the watcher's current batch for up to `debounce_ms`: a file saved just
        before `docker run` would otherwise reach the container late. Two complete watch cycles
        after the call bound that (the one in progress may have started before the change).
        """
        if self._thread is None or not self._thread.is_alive():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((self._cycles + 2, waiter))
        self._waiting.set()
        await waiter

    def _cycle_done(self, cycles: int) -> None:
        keep = []
        for target, waiter in self._waiters:
            if cycles >= target:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                keep.append((target, waiter))
        self._waiters = keep
        if not keep:
            self._waiting.clear()

    def start(self) -> None:
        self._notify = RustNotify([self.root], False, False, 50, self._recursive, True)

    def _close(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def _deliver(self) -> None:
        try:
            self._watch_until_stopped()
        finally:  # stopped or failed: nobody waiting for a catch-up must hang
            self._call(self._cycle_done, sys.maxsize)

    def _watch_until_stopped(self) -> None:
        assert self._notify is not None
        while not self._stop.is_set():
            try:
                changes = self._notify.watch(
                    self._debounce_ms, self._step_ms, IDLE_CYCLE_MS, self._stop
                )
            except Exception:
                log.exception("watching %s failed", self.root)
                return
            if changes == "stop":
                return
            if not isinstance(changes, str):  # else 'signal' or 'timeout'
                paths = self._relative({p for _, p in changes})
                if paths and not self._emit(paths):
                    return
            self._cycles += 1
            if self._waiting.is_set() and not self._call(self._cycle_done, self._cycles):
                return

    def _relative(self, paths: set[str]) -> set[str]:
        prefix = self.root + "/"
        real_dirs: dict[str, str] = {}
        out: set[str] = set()
        for path in paths:
            parent, name = os.path.split(path)
            real = real_dirs.get(parent)
            if real is None:
                real = real_dirs[parent] = os.path.realpath(parent)
            full = f"{real}/{name}"
            if full.startswith(prefix):
                out.add(full[len(prefix) :])
            elif real == self.root:
                out.add(name)
        return out


_MASK = (
    iflags.CREATE
    | iflags.DELETE
    | iflags.MODIFY
    | iflags.CLOSE_WRITE
    | iflags.ATTRIB
    | iflags.MOVED_FROM
    | iflags.MOVED_TO
    | iflags.ONLYDIR
)


class SafeTreeWatcher(_ThreadedWatcher):
    """The runner's watcher: inotify on real directories only, reached without following links."""

    def __init__(
        self, root: SafeRoot, ignore: IgnoreRules, on_paths: OnPaths, *, batch_ms: int = 5
    ) -> None:
        super().__init__(root.path.name, on_paths)
        self._root = root
        self._ignore = ignore
        self._batch_ms = batch_ms
        self._inotify: INotify | None = None
        self._dirs: dict[int, str] = {}  # watch descriptor -> relative directory ("" = root)
        self._lock = threading.Lock()
        self._full = False  # out of watches: fall back to... nothing better than a full rescan

    def start(self) -> None:
        self._inotify = INotify(inheritable=False)
        self._watch_tree("")

    def _close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def _watch_tree(self, rel: str, found: set[str] | None = None) -> None:
        """Watch directory `rel` and the directories below it; the paths listed in them are
        added to `found`, if given.

        Nothing reports what was made in a directory before its watch was in place (the watcher
        may lag far behind a busy container), and the consumer's compare of a path it already
        knows as a directory looks at that directory alone: so a directory that appears is
        delivered with what it holds.  The first watch and the rewatch after an overflow need
        none of it (the scan, or a full compare, follows them).
        """
        try:
            with self._root.directory(rel) as fd:
                self._watch_fd(fd, rel, found)
        except (OSError, PathRefused):
            # Gone, a symlink now, or swapped while being opened (ELOOP): not watched. If a
            # directory comes back there, its move is reported and handled in its turn.
            pass

    def _watch_fd(self, fd: int, rel: str, found: set[str] | None) -> None:
        assert self._inotify is not None
        try:
            wd = self._inotify.add_watch(f"/proc/self/fd/{fd}", _MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not self._full:
                self._full = True
                log.warning(
                    "out of inotify watches under %s: changes below %r go unseen",
                    self._root.path,
                    rel,
                )
            return
        self._dirs[wd] = rel
        try:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(fd)]
        except OSError:
            return
        prefix = f"{rel}/" if rel else ""
        if found is not None:
            found.update(prefix + name for name, _ in entries)
        for name in (name for name, is_dir in entries if is_dir):
            sub = prefix + name
            if self._ignore.prune(sub):
                continue
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError:
                continue  # gone, or swapped for a symlink
            try:
                self._watch_fd(child, sub, found)
            finally:
                os.close(child)

    def _forget(self, rel: str) -> None:
        assert self._inotify is not None
        prefix = rel + "/"
        for wd, path in list(self._dirs.items()):
            if path == rel or path.startswith(prefix):
                del self._dirs[wd]
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass

    def _deliver(self) -> None:
        try:
            self._watch_until_stopped()
        except Exception:  # a bug: into the runner's log, not only onto a thread's stderr
            log.exception("watching %s failed", self._root.path)

    def _watch_until_stopped(self) -> None:
        assert self._inotify is not None
        while not self._stop.is_set():
            try:
                events = self._inotify.read(timeout=200, read_delay=self._batch_ms)
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("watching %s failed", self._root.path)
                return
            paths: set[str] = set()
            overflow = False
            for wd, mask, _, name in events:
                if mask & iflags.Q_OVERFLOW:
                    overflow = True
                    continue
                if mask & iflags.IGNORED:
                    self._dirs.pop(wd, None)
                    continue
                base = self._dirs.get(wd)
                if base is None or not name:
                    continue
                rel = f"{base}/{name}" if base else name
                paths.add(rel)
                if mask & iflags.ISDIR:
                    if mask & (iflags.MOVED_FROM | iflags.DELETE):
                        self._forget(rel)
                    elif mask & (iflags.CREATE | iflags.MOVED_TO) and not self._ignore.prune(rel):
                        self._watch_tree(rel, paths)
            if overflow:
                # Events were lost, among them perhaps the moves and creations that say which
                # directories to watch: watch the tree as it is now, then compare all of it.
                self._rewatch()
                paths.add(FULL_RESCAN)
            if paths and not self._emit(paths):
                return

    def _rewatch(self) -> None:
        assert self._inotify is not None
        for wd in list(self._dirs):
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass
        self._dirs.clear()
        self._watch_tree("")
