"""Two-way sync over a real SSH link: initial sync, edits both ways, deletes, renames, `:ro`,
ignore rules and status. Every wait is on a condition with a bound."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from offload.core.errors import Suspended
from offload.sync.laptop import LaptopSync
from offload.sync.status import SyncState

from .support import SyncLink, until


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def make_tree(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "empty" / "nested").mkdir(parents=True)
    os.symlink("src/pkg/mod.py", root / "link-to-file")
    os.symlink("../src", root / "empty" / "link-to-dir")
    for i in range(200):
        (root / "src" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))


def same_content(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return False


async def test_initial_sync_copies_everything(link: SyncLink, laptop: Path) -> None:
    make_tree(laptop)
    big = laptop / "big.bin"
    with big.open("wb") as fh:
        for _ in range(50):
            fh.write(os.urandom(1 << 20))
    sync = await link.start_sync(laptop)
    remote = link.remote()
    # start() returns once everything is there: no wait needed.
    assert sha256(remote / "big.bin") == sha256(big)
    assert (remote / "src" / "pkg" / "mod.py").read_text() == "print('hi')\n"
    assert os.stat(remote / "run.sh").st_mode & 0o777 == 0o755
    assert os.stat(remote / "run.sh").st_mtime_ns == os.stat(laptop / "run.sh").st_mtime_ns
    assert (remote / "empty" / "nested").is_dir() and not any(
        (remote / "empty" / "nested").iterdir()
    )
    assert os.readlink(remote / "link-to-file") == "src/pkg/mod.py"
    assert os.readlink(remote / "empty" / "link-to-dir") == "../src"
    assert len(list((remote / "src").glob("f*.txt"))) == 200
    status = sync.status()
    assert status.state == SyncState.SYNCED and status.pending_files == 0 and not status.errors
    assert status.remote_path == str(remote)
    assert not [p for p in remote.rglob("*") if p.name.startswith(".offload-tmp-")]


async def test_edits_travel_both_ways(link: SyncLink, laptop: Path) -> None:
    make_tree(laptop)
    await link.start_sync(laptop)
    remote = link.remote()

    (laptop / "src" / "pkg" / "mod.py").write_text("print('edited on the laptop')\n")
    await until(
        lambda: same_content(laptop / "src/pkg/mod.py", remote / "src/pkg/mod.py"), "laptop edit"
    )

    (remote / "out").mkdir()
    (remote / "out" / "result.txt").write_text("written by the container\n")
    await until(
        lambda: same_content(remote / "out/result.txt", laptop / "out/result.txt"),
        "container write",
    )

    os.chmod(laptop / "src" / "f1.txt", 0o750)
    await until(lambda: os.stat(remote / "src/f1.txt").st_mode & 0o777 == 0o750, "exec bit")

    os.symlink("pkg/mod.py", laptop / "src" / "new-link")
    await until(lambda: os.path.islink(remote / "src/new-link"), "new symlink")
    assert os.readlink(remote / "src" / "new-link") == "pkg/mod.py"

    (laptop / "fresh" / "deep").mkdir(parents=True)
    await until(lambda: (remote / "fresh" / "deep").is_dir(), "new empty directories")


async def test_deletes_and_renames(link: SyncLink, laptop: Path) -> None:
    make_tree(laptop)
    await link.start_sync(laptop)
    remote = link.remote()

    (laptop / "src" / "f0.txt").unlink()
    await until(lambda: not (remote / "src/f0.txt").exists(), "file delete")

    (laptop / "src" / "f2.txt").rename(laptop / "src" / "renamed.txt")
    await until(
        lambda: (
            same_content(laptop / "src/renamed.txt", remote / "src/renamed.txt")
            and not (remote / "src/f2.txt").exists()
        ),
        "file rename",
    )

    (laptop / "src").rename(laptop / "moved")
    await until(
        lambda: not (remote / "src").exists() and (remote / "moved/pkg/mod.py").is_file(),
        "directory rename",
    )
    assert len(list((remote / "moved").glob("f*.txt"))) == 198

    # the container deletes and renames too
    (remote / "moved" / "f10.txt").unlink()
    (remote / "moved" / "f11.txt").rename(remote / "moved" / "eleven.txt")
    await until(
        lambda: (
            not (laptop / "moved/f10.txt").exists()
            and same_content(remote / "moved/eleven.txt", laptop / "moved/eleven.txt")
            and not (laptop / "moved/f11.txt").exists()
        ),
        "container delete and rename",
    )

    for p in sorted((laptop / "empty").rglob("*"), reverse=True):
        p.unlink() if p.is_symlink() or p.is_file() else p.rmdir()
    (laptop / "empty").rmdir()
    await until(lambda: not (remote / "empty").exists(), "tree delete")


async def test_read_only_mount_syncs_one_way(link: SyncLink, laptop: Path) -> None:
    make_tree(laptop)
    sync = await link.start_sync(laptop, read_only=True)
    remote = link.remote()
    (remote / "container-wrote.txt").write_text("should stay on the runner")
    (laptop / "laptop-wrote.txt").write_text("goes to the runner")
    await until(lambda: (remote / "laptop-wrote.txt").exists(), "laptop change")
    await sync.flush()
    assert not (laptop / "container-wrote.txt").exists()


async def test_ignore_rules(link: SyncLink, laptop: Path) -> None:
    make_tree(laptop)
    (laptop / ".dockerignore").write_text("*.log\nbuild\n**/*.tmp\n")
    (laptop / ".offloadignore").write_text("!keep.log\n")
    (laptop / "a.log").write_text("ignored")
    (laptop / "keep.log").write_text("kept by .offloadignore")
    (laptop / "build").mkdir()
    (laptop / "build" / "out.o").write_text("ignored")
    (laptop / "src" / "x.tmp").write_text("ignored")
    (laptop / "src" / "y.log").write_text("not ignored: *.log is for the root only")
    sync = await link.start_sync(laptop)
    remote = link.remote()
    assert (remote / ".dockerignore").exists() and (remote / "keep.log").exists()
    assert (remote / "src" / "y.log").exists()
    assert not (remote / "a.log").exists() and not (remote / "build").exists()
    assert not (remote / "src" / "x.tmp").exists()

    # ignored both ways: the container's build output stays on the runner
    (remote / "build").mkdir()
    (remote / "build" / "big.o").write_text("runner only")
    (laptop / "b.log").write_text("ignored")
    (laptop / "marker.txt").write_text("not ignored")
    await until(lambda: (remote / "marker.txt").exists(), "a change after the ignored ones")
    await sync.flush()
    assert not (remote / "b.log").exists()
    assert not (laptop / "build" / "big.o").exists()


async def test_status_reports_pending_and_errors(
    link: SyncLink, laptop: Path, tmp_path: Path
) -> None:
    (laptop / "a.txt").write_text("a")
    (laptop / "d").mkdir()
    sync = await link.start_sync(laptop, read_only=True)  # the runner does not watch: no echo
    assert sync.status().state == SyncState.SYNCED

    # A change noticed and not yet confirmed is pending (marked the way the watcher does).
    assert sync._peer is not None
    sync._peer.mark_dirty({"a.txt"})
    snapshot = sync.status()
    assert snapshot.state == SyncState.PENDING and snapshot.pending_files >= 1
    await sync.flush()
    await until(lambda: sync.status().pending_files == 0, "pending drained")

    # A container swapped the directory for a link: the runner refuses to write through it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (link.remote() / "d").rmdir()
    os.symlink(elsewhere, link.remote() / "d")
    (laptop / "d" / "new.txt").write_text("x")
    await until(lambda: sync.status().errors, "the refused path reported")
    snapshot = sync.status()
    assert snapshot.state == SyncState.ERROR
    assert snapshot.errors[-1].path == "d/new.txt" and "symlink" in snapshot.errors[-1].message
    assert not os.listdir(elsewhere)


async def test_manager_probes_the_mount_area_and_starts_each_sync_once(
    link: SyncLink, laptop: Path
) -> None:
    import asyncio

    from offload.agent.binds import rewrite_create_body
    from offload.sync.laptop import SyncManager

    (laptop / "app.py").write_text("app\n")
    (laptop / "app.yml").write_text("config\n")
    manager = SyncManager(link.open_stream)
    try:
        area = await manager.mount_area()
        assert area == str(link.mount_area)
        body = json.dumps(
            {"HostConfig": {"Binds": [f"{laptop}:/app:ro", f"{laptop}/app.yml:/etc/app.yml"]}}
        ).encode()
        rewrite = rewrite_create_body(body, area)
        # what the proxy does before forwarding the create: every sync done, concurrently safe
        syncs = await asyncio.gather(
            *(
                manager.ensure(s.laptop_path, s.subdir, read_only=s.read_only, only=s.only)
                for s in rewrite.syncs
            ),
            *(
                manager.ensure(s.laptop_path, s.subdir, read_only=s.read_only, only=s.only)
                for s in rewrite.syncs
            ),
        )
        assert len({id(s) for s in syncs}) == 2
        binds = json.loads(rewrite.body)["HostConfig"]["Binds"]
        assert Path(binds[0].split(":")[0], "app.py").read_text() == "app\n"
        file_source = Path(binds[1].split(":")[0])
        assert file_source.read_text() == "config\n" and sorted(os.listdir(file_source.parent)) == [
            "app.yml"
        ]
        (laptop / "app.yml").write_text("config v2\n")
        await until(lambda: file_source.read_text() == "config v2\n", "single-file edit")
        # the file lands before the runner's acknowledgement clears the pending count
        await asyncio.gather(*(s.flush() for s in syncs))
        assert [s.state for s in manager.statuses()] == [SyncState.SYNCED, SyncState.SYNCED]
    finally:
        await manager.close()


async def test_an_edit_just_before_a_flush_is_on_the_runner_after_it(
    link: SyncLink, laptop: Path
) -> None:
    """`echo v2 > app.txt && docker run -v "$PWD":/app …`: the container create flushes the
    sync, and must see the edit although the watcher has not handed it over yet."""
    (laptop / "app.txt").write_text("v1")
    sync = await link.start_sync(laptop)
    remote = link.remote()
    for version in range(2, 7):
        (laptop / "app.txt").write_text(f"v{version}")
        await sync.flush()
        assert (remote / "app.txt").read_text() == f"v{version}"


async def test_an_idle_session_pauses_the_sync_until_the_tunnel_is_back(
    link: SyncLink, laptop: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the tunnel is suspended on purpose, the sync waits for the kick that comes with the
    tunnel (no retry loop, no warnings), then picks up the edits made meanwhile."""
    caplog.set_level(logging.INFO, logger="offload.sync.laptop")
    suspended = False

    async def open_stream():  # type: ignore[no-untyped-def]
        if suspended:
            raise Suspended("the tunnel is suspended while the session is idle")
        return await link.open_stream()

    sync = LaptopSync(laptop, "b0test", open_stream, reconnect_initial_s=0.01)
    link.syncs.append(sync)
    await sync.start()
    suspended = True
    assert sync._peer is not None
    sync._peer.writer.close()  # what suspending the tunnel does to the stream
    await until(lambda: "paused while the session is idle" in caplog.text, "the pause")
    assert sync.status().state == SyncState.DISCONNECTED
    (laptop / "while-idle.txt").write_text("edited while idle")

    suspended = False
    sync.kick()  # the tunnel is back
    await until(lambda: (link.remote() / "while-idle.txt").exists(), "the edit after the resume")
    assert not [
        r for r in caplog.records if r.levelno >= logging.WARNING and "Suspended" in r.getMessage()
    ]
