"""A container swaps synced directories and files for symlinks to the host while the laptop
pushes into them, for real: a process running as the sandbox's root (an unprivileged host uid
that owns the mount area) exchanges them in a tight loop, atomically (`renameat2`
RENAME_EXCHANGE) and not, while the laptop's side of the protocol keeps writing, deleting,
linking and asking for hashes there. The runner is root: if any of its operations followed a
link, it would write into, or read from, the directory standing for `/etc`."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

from offload.core.waiting import within
from offload.sync.protocol import SMALL_FILE_MAX, Kind, frame, jframe

from .support import (
    AS_ROOT,
    IDENTITY,
    OWNER,
    WAIT,
    as_identity,
    as_identity_argv,
    open_link,
    owned_area,
    shared_dir,
    small,
    start_raw,
    tree_state,
    until,
)

pytestmark = AS_ROOT

SUBDIR = "b0swap"
ROUNDS = 150  # laptop batches pushed while the swapping goes on
MAX_SWAPS = 5_000_000  # the attacker's bound; it stops earlier, once the laptop is done

# Runs as the identity in <area>/<subdir>, until told to stop (or `bound` rounds).
ATTACKER = r"""
import ctypes, os, sys
where, outside, stop, bound = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
canary, secret = outside + "/canary", outside + "/secret"

def exchange(a, b):
    return libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) == 0

def plant(name, target):
    try:
        os.symlink(target, name)
    except FileExistsError:
        pass

os.chdir(where)
plant("d.alt", outside)
print("ready", flush=True)
swaps = 0
for i in range(bound):
    if i % 64 == 63 and os.path.exists(stop):
        break
    # `d`, the directory the laptop writes into, trades places with a link to the host's.
    if exchange("d", "d.alt"):
        swaps += 1
    # `f.txt`, the file the laptop overwrites, with a link to the canary (planted again when
    # the runner has kept one of them aside as a conflict).
    if exchange("f.txt", "f.alt"):
        swaps += 1
    else:
        plant("f.alt", canary)
    if i % 4 == 0:
        # A file of the container's, for the runner to read and send, then a link to a
        # root-only host file in its place: atomically, while the runner's watcher looks.
        with open("g.new", "w") as fh:
            fh.write("the container's %d" % i)
        os.rename("g.new", "g.txt")
        plant("g.link", secret)
        os.rename("g.link", "g.txt")
        swaps += 1
    if i % 7 == 0:  # the slow way too: a moment with no `s` at all, then a link
        try:
            os.rename("s", "s.real")
            os.symlink(outside + "/sub", "s")
            swaps += 1
            os.unlink("s")
            os.rename("s.real", "s")
        except OSError:
            pass
# Leave the real ones in place, so that the laptop's last push must land in them.
for name, alt in (("d", "d.alt"), ("f.txt", "f.alt")):
    if os.path.islink(name) and os.path.lexists(alt) and not os.path.islink(alt):
        exchange(name, alt)
if os.path.islink("s") and os.path.isdir("s.real"):
    os.unlink("s")
    os.rename("s.real", "s")
print(swaps, flush=True)
"""


def round_frames(i: int, outside: Path) -> bytes:
    """One batch of every kind of change, aimed at the swapped names and below them."""
    frames = [
        small(f"d/f{i % 8}", b"laptop %d" % i),
        small("f.txt", b"laptop file %d" % i, 0o600),
        small(f"s/in-s{i % 3}", b"s %d" % i),
        jframe(Kind.MKDIR, {"p": f"d/sub{i % 4}", "mode": 0o750}),
        jframe(Kind.MKDIR, {"p": f"s/deep/er{i % 2}", "mode": 0o700}),
        small(f"d/sub{i % 4}/nested", b"nested %d" % i),
        jframe(Kind.SYMLINK, {"p": f"d/l{i % 4}", "target": str(outside / "canary")}),
        jframe(Kind.SYMLINK, {"p": f"s/rel{i % 2}", "target": "../../../../etc/passwd"}),
        jframe(Kind.META, {"p": "d", "mode": 0o777, "expect": ["d", 0, 0, 0o755, None]}),
        jframe(Kind.META, {"p": "f.txt", "mode": 0o666, "mtime_ns": 5, "expect": None}),
        jframe(Kind.META, {"p": f"d/f{i % 8}", "mode": 0o666, "mtime_ns": 5, "expect": None}),
        jframe(Kind.DELETE, {"p": f"d/f{(i + 3) % 8}", "expect": None}),
        jframe(Kind.DELETE, {"p": f"s/in-s{(i + 1) % 3}", "expect": None}),
        jframe(Kind.HASH_REQ, {"paths": ["f.txt", "g.txt", f"d/f{i % 8}", "d/canary", "s/file"]}),
    ]
    if i % 10 == 0:  # a multi-frame file, written while its directory may flip
        frames += [
            jframe(Kind.FILE_BEGIN, {"p": "d/big"}),
            frame(Kind.FILE_DATA, b"B" * SMALL_FILE_MAX),
            frame(Kind.FILE_DATA, b"b" * 1000),
            jframe(Kind.FILE_END, {"mode": 0o644, "mtime_ns": 1}),
        ]
    return b"".join(frames)


async def test_symlink_swaps_never_lead_the_runner_outside_the_area() -> None:
    with shared_dir() as base:
        area = owned_area(base)
        outside = base / "outside"  # stands for /etc: root's, and the identity cannot write it
        (outside / "sub").mkdir(parents=True)
        canary, secret = secrets.token_hex(16).encode(), secrets.token_hex(16).encode()
        (outside / "canary").write_bytes(canary)
        (outside / "secret").write_bytes(secret)
        (outside / "secret").chmod(0o600)
        (outside / "sub" / "file").write_bytes(canary)
        before = tree_state(outside)
        link = await open_link(area, area_owner=OWNER)
        laptop = await start_raw(link, SUBDIR)
        remote = area / SUBDIR
        try:
            await laptop.push(
                jframe(Kind.MKDIR, {"p": "d", "mode": 0o755})
                + jframe(Kind.MKDIR, {"p": "s", "mode": 0o755})
                + small("f.txt", b"first")
                + small("d/f0", b"first")
            )
            # The sandbox's root can only play with what the runner gave it.
            assert os.stat(remote / "d").st_uid == IDENTITY

            stop = base / "stop"
            attacker = await asyncio.create_subprocess_exec(
                *as_identity_argv(ATTACKER, str(remote), str(outside), str(stop), str(MAX_SWAPS)),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert attacker.stdout is not None
            ready = await within(attacker.stdout.readline(), WAIT)
            assert ready == b"ready\n", (await attacker.communicate())[1].decode()
            for i in range(ROUNDS):
                await laptop.push(round_frames(i, outside))
            stop.touch()
            out, err = await within(attacker.communicate(), WAIT)
            assert attacker.returncode == 0, err.decode()
            swaps = int(out.split()[-1])
            assert swaps > 0  # the attack really ran against what the runner wrote

            # Afterwards the sync goes on, into the real directories.
            await laptop.push(small("d/after.txt", b"after") + small("f.txt", b"last"))
            assert (remote / "d" / "after.txt").read_bytes() == b"after"
            assert not os.path.islink(remote / "d")
            assert (remote / "f.txt").read_bytes() == b"last"
            # ... and so do the container's changes, back to the laptop.
            await as_identity(
                "import sys; open(sys.argv[1], 'w').write('from the container')",
                str(remote / "d" / "by-container"),
            )
            await until(lambda: "d/by-container" in laptop.files_received(), "the container's file")
        finally:
            await laptop.close()
            await link.close()

        assert tree_state(outside) == before  # nothing created, changed or even chmod'ed
        assert sorted(os.listdir(base)) == ["area", "outside", "stop"]
        sent = laptop.received_bytes()
        assert canary not in sent and secret not in sent  # nothing read through a link
        read_through = {hashlib.sha256(canary).hexdigest(), hashlib.sha256(secret).hexdigest()}
        assert not laptop.hashes() & read_through
        # What the swaps broke is reported per path (how many depends on the interleaving).
        assert all(error["p"] for error in laptop.errors())
        for top, dirs, files in os.walk(area):  # everything there is the sandbox's to change
            for name in dirs + files:
                st = os.lstat(os.path.join(top, name))
                assert (st.st_uid, st.st_gid) == OWNER, os.path.join(top, name)


# A single-file bind mount is written in place (its inode is what the container holds).
SINGLE_ATTACKER = r"""
import ctypes, os, sys
where, target, stop, bound = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
libc = ctypes.CDLL(None, use_errno=True)
os.chdir(where)
os.symlink(target, "app.alt")
print("ready", flush=True)
swaps = 0
for i in range(bound):
    if i % 64 == 63 and os.path.exists(stop):
        break
    if libc.renameat2(-100, b"app.cfg", -100, b"app.alt", 2) == 0:
        swaps += 1
if os.path.islink("app.cfg"):
    libc.renameat2(-100, b"app.cfg", -100, b"app.alt", 2)
print(swaps, flush=True)
"""


async def test_a_single_file_mount_swapped_for_a_link_is_never_written_through() -> None:
    with shared_dir() as base:
        area = owned_area(base)
        outside = base / "outside"
        outside.mkdir()
        canary = secrets.token_hex(16).encode()
        (outside / "canary").write_bytes(canary)
        before = tree_state(outside)
        link = await open_link(area, area_owner=OWNER)
        laptop = await start_raw(link, SUBDIR, only="app.cfg")
        remote = area / SUBDIR
        try:
            await laptop.push(small("app.cfg", b"v0"))
            assert os.stat(remote / "app.cfg").st_uid == IDENTITY
            stop = base / "stop"
            attacker = await asyncio.create_subprocess_exec(
                *as_identity_argv(
                    SINGLE_ATTACKER, str(remote), str(outside / "canary"), str(stop), str(MAX_SWAPS)
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert attacker.stdout is not None
            ready = await within(attacker.stdout.readline(), WAIT)
            assert ready == b"ready\n", (await attacker.communicate())[1].decode()
            for i in range(ROUNDS):
                await laptop.push(
                    small("app.cfg", b"v%d" % i)
                    + jframe(
                        Kind.META, {"p": "app.cfg", "mode": 0o666, "mtime_ns": 5, "expect": None}
                    )
                    + jframe(Kind.HASH_REQ, {"paths": ["app.cfg"]})
                )
            stop.touch()
            out, err = await within(attacker.communicate(), WAIT)
            assert attacker.returncode == 0, err.decode()
            assert int(out.split()[-1]) > 0
            await laptop.push(small("app.cfg", b"last"))
            assert (remote / "app.cfg").read_bytes() == b"last"
        finally:
            await laptop.close()
            await link.close()
        assert tree_state(outside) == before
        assert canary not in laptop.received_bytes()
        assert hashlib.sha256(canary).hexdigest() not in laptop.hashes()
