"""The runner's watcher: what lands in a directory before its watch is in place is still seen."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from offload.core.waiting import within
from offload.sync.ignore import IgnoreRules
from offload.sync.paths import SafeRoot
from offload.sync.watcher import SafeTreeWatcher


async def _first_batch_with(watcher: SafeTreeWatcher, rel: str) -> set[str]:
    """Run `watcher` until it delivers `rel`; the batch that holds it."""
    found: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()

    def on_paths(paths: set[str]) -> None:
        if rel in paths and not found.done():
            found.set_result(paths)

    watcher._on_paths = on_paths
    watcher.run(asyncio.get_running_loop())
    try:
        return await within(found, 10)
    finally:
        watcher.stop()


async def test_entries_made_in_a_new_directory_before_it_is_watched_are_delivered(
    tmp_path: Path,
) -> None:
    with SafeRoot(tmp_path) as root:
        watcher = SafeTreeWatcher(root, IgnoreRules(), lambda paths: None)
        watcher.start()
        # The watcher has not read the creation of `d` yet when these appear in it (as when it
        # lags behind a busy container): no event will ever name them.
        (tmp_path / "d" / "sub").mkdir(parents=True)
        (tmp_path / "d" / "early").write_text("x")
        (tmp_path / "d" / "sub" / "deeper").write_text("y")

        batch = await _first_batch_with(watcher, "d")

        assert {"d/early", "d/sub", "d/sub/deeper"} <= batch


async def test_a_directory_that_cannot_be_opened_does_not_stop_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SafeRoot(tmp_path) as root:
        opened = root.directory

        @contextmanager
        def swapped(rel: str) -> Iterator[int]:
            if rel == "flip":  # a link when opened, a directory again when looked at
                raise OSError(errno.ELOOP, "Too many levels of symbolic links")
            with opened(rel) as fd:
                yield fd

        monkeypatch.setattr(root, "directory", swapped)
        watcher = SafeTreeWatcher(root, IgnoreRules(), lambda paths: None)
        watcher.start()
        (tmp_path / "flip").mkdir()
        (tmp_path / "after").write_text("x")

        assert "after" in await _first_batch_with(watcher, "after")
