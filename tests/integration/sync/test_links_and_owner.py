"""Symlinks travel as they are, both ways (absolute, climbing out, dangling: the same target
text, never resolved by the sync), and what the runner creates in the mount area belongs to the
sandbox's root (`area_owner`), so that the session's containers can change it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from offload.sync.protocol import Entry, Kind, jframe
from offload.sync.remote import CONFLICTS_DIR

from .support import (
    AS_ROOT,
    IDENTITY,
    OWNER,
    as_identity,
    open_link,
    owned_area,
    shared_dir,
    small,
    start_raw,
    until,
)

pytestmark = AS_ROOT

LAPTOP_LINKS = {
    "abs": "/etc/passwd",
    "abs-dir": "/var/lib/offload",
    "rel": "src/x.txt",
    "up": "../../../../../..",
    "dangling": "no/such/file",
    "src/back": "../rel",
    "src/climb": "sub/../../../outside",
}


def regular_files(root: Path) -> list[Path]:
    found = []
    for top, _, files in os.walk(root):  # never follows a link
        for name in files:
            path = Path(top, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return found


def everything(root: Path) -> list[Path]:
    found = [root]
    for top, dirs, files in os.walk(root):
        found += [Path(top, name) for name in dirs + files]
    return found


async def test_laptop_links_arrive_as_they_are_and_everything_belongs_to_the_owner() -> None:
    with shared_dir() as base:
        area = owned_area(base)
        secret = base / "root-only"
        secret.write_text("host secret")
        secret.chmod(0o600)
        laptop = base / "laptop"
        (laptop / "src").mkdir(parents=True)
        (laptop / "src").chmod(0o750)
        (laptop / "src" / "x.txt").write_text("x")
        (laptop / "src" / "x.txt").chmod(0o640)
        (laptop / "run.sh").write_text("#!/bin/sh\n")
        (laptop / "run.sh").chmod(0o755)
        links = {**LAPTOP_LINKS, "secret": str(secret)}
        for rel, target in links.items():
            os.symlink(target, laptop / rel)
        link = await open_link(area, area_owner=OWNER)
        try:
            sync = await link.start_sync(laptop)
            remote = link.remote()
            for rel, target in links.items():
                assert os.readlink(remote / rel) == target, rel
            assert not sync.status().errors
            assert stat.S_IMODE(os.stat(remote / "src").st_mode) == 0o750
            assert stat.S_IMODE(os.stat(remote / "src" / "x.txt").st_mode) == 0o640
            assert stat.S_IMODE(os.stat(remote / "run.sh").st_mode) == 0o755

            os.symlink("/root/.ssh/id_ed25519", laptop / "src" / "later")  # after the start
            await until(lambda: os.path.islink(remote / "src" / "later"), "a later link")
            assert os.readlink(remote / "src" / "later") == "/root/.ssh/id_ed25519"
            await sync.flush()
            for path in everything(remote):
                st = os.lstat(path)
                assert (st.st_uid, st.st_gid) == OWNER, path
            assert all("host secret" not in p.read_text() for p in regular_files(area))

            # The sandbox's root changes what the runner made, as on a local bind mount.
            await as_identity(
                "import os, sys\n"
                "os.chdir(sys.argv[1])\n"
                "os.chmod('src', 0o700)\n"
                "os.rename('src/x.txt', 'src/y.txt')\n"
                "os.unlink('run.sh')\n"
                "os.unlink('abs')\n"
                "os.symlink('/etc/shadow', 'abs')\n",
                str(remote),
            )
            await until(
                lambda: (
                    (laptop / "src" / "y.txt").exists()
                    and not (laptop / "src" / "x.txt").exists()
                    and not (laptop / "run.sh").exists()
                    and os.readlink(laptop / "abs") == "/etc/shadow"
                    and stat.S_IMODE(os.stat(laptop / "src").st_mode) == 0o700
                ),
                "the container's changes on the laptop",
            )
        finally:
            await link.close()


async def test_container_links_and_files_come_back_to_the_laptop_as_its_user() -> None:
    with shared_dir() as base:
        area = owned_area(base)
        secret = base / "root-only"
        secret.write_text("host secret")
        secret.chmod(0o600)
        laptop = base / "laptop"
        laptop.mkdir()
        link = await open_link(area, area_owner=OWNER)
        try:
            sync = await link.start_sync(laptop)
            remote = link.remote()
            container_links = {
                "c-secret": str(secret),  # the runner could read it; it must send the link
                "c-abs": "/etc/passwd",
                "c-rel": "../elsewhere/x",
                "c-dangling": "/nonexistent/y",
            }
            await as_identity(
                "import os, sys\n"
                "os.chdir(sys.argv[1])\n"
                "links = dict(zip(sys.argv[2::2], sys.argv[3::2]))\n"
                "for name, target in links.items():\n"
                "    os.symlink(target, name)\n"
                "fd = os.open('c-file', os.O_WRONLY | os.O_CREAT, 0o600)\n"
                "os.write(fd, b'written by root in the sandbox')\n"
                "os.close(fd)\n"
                "os.mkdir('cdir')\n"
                "os.chmod('cdir', 0o777)\n",
                str(remote),
                *[x for pair in container_links.items() for x in pair],
            )
            # A subordinate uid of the sandbox (a container's non-root user) writes too.
            await as_identity(
                "import os, sys\n"
                "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n"
                "os.write(fd, b'written by a container user')\n"
                "os.close(fd)\n",
                str(remote / "cdir" / "sub-file"),
                uid=IDENTITY + 7,
            )
            await until(
                lambda: (
                    (laptop / "cdir" / "sub-file").exists()
                    and (laptop / "c-file").exists()
                    and all(os.path.islink(laptop / name) for name in container_links)
                ),
                "the container's files and links on the laptop",
            )
            await sync.flush()
            for name, target in container_links.items():
                assert os.readlink(laptop / name) == target, name
            assert (laptop / "c-file").read_text() == "written by root in the sandbox"
            assert (laptop / "cdir" / "sub-file").read_text() == "written by a container user"
            for path in [laptop / "c-file", laptop / "cdir", laptop / "cdir" / "sub-file"]:
                assert os.lstat(path).st_uid == os.geteuid(), path  # the laptop user's
            assert stat.S_IMODE(os.stat(laptop / "c-file").st_mode) == 0o600
            assert all("host secret" not in p.read_text() for p in regular_files(laptop))
            assert not sync.status().errors
        finally:
            await link.close()


async def test_conflict_copies_and_single_file_mounts_belong_to_the_owner() -> None:
    with shared_dir() as base:
        area = owned_area(base)
        link = await open_link(area, area_owner=OWNER)
        try:
            raw = await start_raw(link, "b0raw")
            await raw.push(
                small("x.txt", b"first") + jframe(Kind.SYMLINK, {"p": "l", "target": "/"})
            )
            # The laptop believes the runner has something else: the runner's is kept aside.
            await raw.push(small("x.txt", b"second", expect=["f", 1, 1, 0o644, None]))
            second = Entry("f", 6, 1_000_000_000, 0o644).to_wire()
            await raw.push(small("x.txt", b"third", expect=second))  # no conflict: replaced
            assert (area / "b0raw" / "x.txt").read_bytes() == b"third"
            assert os.readlink(area / "b0raw" / "l") == "/"
            [kept] = sorted((area / CONFLICTS_DIR / "b0raw").iterdir())
            assert kept.read_bytes() == b"first"
            for path in [area / CONFLICTS_DIR, area / CONFLICTS_DIR / "b0raw", kept]:
                assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == OWNER, path
            await raw.close()

            single = await start_raw(link, "b0one", only="app.cfg")
            await single.push(small("app.cfg", b"config", mode=0o640))
            app = area / "b0one" / "app.cfg"
            assert app.read_bytes() == b"config"
            assert (os.stat(app).st_uid, os.stat(app).st_gid) == OWNER
            assert stat.S_IMODE(os.stat(app).st_mode) == 0o640
            await single.close()
            for path in everything(area):
                st = os.lstat(path)
                assert (st.st_uid, st.st_gid) == OWNER, path
        finally:
            await link.close()
