"""Conflicts: the laptop wins, the runner's overwritten version is kept aside and reported."""

from __future__ import annotations

import os
from pathlib import Path

from offload.sync.remote import CONFLICTS_DIR

from .support import SyncLink, open_link, until


def kept_aside(mount_area: Path, subdir: str = "b0test") -> list[Path]:
    area = mount_area / CONFLICTS_DIR / subdir
    return sorted(area.iterdir()) if area.exists() else []


async def test_both_changed_while_the_runner_had_not_noticed(
    laptop: Path, mount_area: Path
) -> None:
    """The container's write is not yet seen by the runner's watcher when the laptop's arrives."""
    (laptop / "app.cfg").write_text("v1\n")
    # A runner watcher that batches for long: the container's write stays unnoticed meanwhile.
    link = await open_link(mount_area, batch_ms=3000)
    try:
        sync = await link.start_sync(laptop)
        remote = link.remote()
        (remote / "app.cfg").write_text("container v2\n")
        (laptop / "app.cfg").write_text("laptop v2, longer\n")
        await until(lambda: sync.status().conflicts, "the conflict reported")
        [conflict] = sync.status().conflicts
        assert conflict.path == "app.cfg"
        assert Path(conflict.kept_at).read_text() == "container v2\n"
        assert Path(conflict.kept_at).parent == mount_area / CONFLICTS_DIR / "b0test"
        assert (remote / "app.cfg").read_text() == "laptop v2, longer\n"
        await until(
            lambda: (laptop / "app.cfg").read_text() == "laptop v2, longer\n", "laptop kept"
        )
        # once the runner's watcher wakes up it sees the laptop's version: nothing echoes back
        (laptop / "later.txt").write_text("x")
        await until(lambda: (remote / "later.txt").exists(), "a later change")
        await sync.flush()
        assert (laptop / "app.cfg").read_text() == "laptop v2, longer\n"
        assert len(sync.status().conflicts) == 1
    finally:
        await link.close()


async def test_both_changed_while_the_laptop_had_not_noticed(
    laptop: Path, mount_area: Path
) -> None:
    """The runner's change reaches a laptop whose own edit is still unsent: the laptop keeps its."""
    (laptop / "notes.md").write_text("v1\n")
    link = await open_link(mount_area)
    try:
        # A laptop watcher that waits long before reporting: its edit stays unsent meanwhile.
        sync = await link.start_sync(laptop, step_ms=2000, debounce_ms=4000)
        remote = link.remote()
        (laptop / "notes.md").write_text("laptop edit\n")
        (remote / "notes.md").write_text("container edit\n")
        await until(lambda: sync.status().conflicts, "the conflict reported")
        [conflict] = sync.status().conflicts
        assert Path(conflict.kept_at).read_text() == "container edit\n"
        await until(lambda: (remote / "notes.md").read_text() == "laptop edit\n", "laptop wins")
        assert (laptop / "notes.md").read_text() == "laptop edit\n"
    finally:
        await link.close()


async def test_reconnect_reconciles_and_keeps_the_runner_version_aside(
    link: SyncLink, laptop: Path
) -> None:
    (laptop / "same.txt").write_text("same\n")
    (laptop / "edited-both.txt").write_text("base\n")
    (laptop / "edited-laptop.txt").write_text("base\n")
    (laptop / "edited-runner.txt").write_text("base\n")
    (laptop / "deleted-on-runner.txt").write_text("base\n")
    sync = await link.start_sync(laptop)
    remote = link.remote()

    # The stream goes down (tunnel lost); both sides change meanwhile.
    await sync.close()
    (laptop / "edited-both.txt").write_text("laptop\n")
    (remote / "edited-both.txt").write_text("runner!\n")
    (laptop / "edited-laptop.txt").write_text("laptop only\n")
    (remote / "edited-runner.txt").write_text("runner only\n")
    (remote / "deleted-on-runner.txt").unlink()
    (remote / "new-on-runner.txt").write_text("new\n")
    os.utime(remote / "same.txt", ns=(1, 1))  # same content, other mtime: no transfer, no conflict

    # The same sync state reconnects (what the supervisor does after a drop).
    sync._closing.clear()
    await sync.start()
    assert (remote / "edited-both.txt").read_text() == "laptop\n"
    assert (remote / "edited-laptop.txt").read_text() == "laptop only\n"
    await until(
        lambda: (laptop / "edited-runner.txt").read_text() == "runner only\n", "runner edit pulled"
    )
    await until(lambda: (laptop / "new-on-runner.txt").exists(), "runner file pulled")
    assert not (laptop / "deleted-on-runner.txt").exists()
    assert os.stat(remote / "same.txt").st_mtime_ns == os.stat(laptop / "same.txt").st_mtime_ns
    conflicts = sync.status().conflicts
    assert [c.path for c in conflicts] == ["edited-both.txt"]
    assert Path(conflicts[0].kept_at).read_text() == "runner!\n"
