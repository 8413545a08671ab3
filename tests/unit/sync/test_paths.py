"""Safe resolution: nothing reaches outside the root, whatever the names or planted symlinks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from offload.sync.paths import PathRefused, SafeRoot, split_rel

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another uid needs root")
OWNER = (1900123, 1900124)


@pytest.mark.parametrize(
    "rel", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a\0b"]
)
def test_paths_that_are_not_plain_relative_names_are_refused(rel: str) -> None:
    with pytest.raises(PathRefused):
        split_rel(rel)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[SafeRoot, Path, Path]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("secret")
    safe = SafeRoot(root)
    yield safe, root, outside
    safe.close()


def test_a_symlink_planted_as_a_directory_is_not_followed(tree) -> None:  # type: ignore[no-untyped-def]
    safe, root, outside = tree
    os.symlink(outside, root / "planted")
    with pytest.raises(PathRefused):
        safe.create_temp("planted/new", 1)
    with pytest.raises(PathRefused):
        safe.mkdir("planted/dir", 0o755)
    with pytest.raises(PathRefused):
        safe.open_read("planted/secret")
    assert sorted(os.listdir(outside)) == ["secret"]


def test_a_symlink_is_never_read_through(tree) -> None:  # type: ignore[no-untyped-def]
    safe, root, outside = tree
    os.symlink(outside / "secret", root / "leak")
    with pytest.raises(PathRefused):
        safe.open_read("leak")
    assert safe.entry("leak").kind == "l"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("rel", "target"),
    [
        ("a/ok", "../b"),
        ("x", "/etc/passwd"),  # absolute: resolved inside a container, never here
        ("a/up", "../../outside/secret"),
        ("x", "a/../../y"),
        ("a/b/dangling", "no/such/thing"),
        ("x", ".."),
    ],
)
def test_symlinks_are_written_with_their_target_as_it_is(tree, rel: str, target: str) -> None:  # type: ignore[no-untyped-def]
    safe, root, outside = tree
    safe.symlink(rel, target, 1)
    assert os.readlink(root / rel) == target
    assert safe.entry(rel).target == target  # type: ignore[union-attr]
    assert sorted(os.listdir(outside)) == ["secret"]


def test_a_symlink_is_replaced_not_written_through(tree) -> None:  # type: ignore[no-untyped-def]
    safe, root, outside = tree
    os.symlink(outside / "secret", root / "link")
    safe.symlink("link", "elsewhere", 1)
    assert os.readlink(root / "link") == "elsewhere"
    with pytest.raises(PathRefused):
        safe.symlink("x", "", 2)
    os.symlink(outside / "secret", root / "single")
    with pytest.raises(PathRefused):
        safe.open_in_place("single")
    assert (outside / "secret").read_text() == "secret"


def test_a_fifo_does_not_hang_a_single_file_write(tree) -> None:  # type: ignore[no-untyped-def]
    safe, root, _ = tree
    os.mkfifo(root / "pipe")
    with pytest.raises(PathRefused):
        safe.open_in_place("pipe")  # no reader: without O_NONBLOCK this would block forever
    reader = os.open(root / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(PathRefused):
            safe.open_in_place("pipe")
    finally:
        os.close(reader)


@AS_ROOT
def test_what_is_created_belongs_to_the_owner(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "theirs").mkdir()
    os.chown(tmp_path / "root" / "theirs", 1900200, 1900200)  # a container's: keeps its owner
    with SafeRoot(tmp_path / "root", owner=OWNER) as area, SafeRoot.open_child(area, "sub") as safe:
        safe.mkdir("d/e", 0o750)
        fd, pfd, tmp, name = safe.create_temp("d/f/file", 1)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        os.close(fd)
        os.close(pfd)
        safe.symlink("d/link", "/etc/passwd", 2)
        fd, pfd, _ = safe.open_in_place("single")
        os.close(fd)
        os.close(pfd)
        area.mkdir("theirs", 0o755)
        with safe.batch():
            safe.mkdir("g/h", 0o700)
    sub = tmp_path / "root" / "sub"
    made = [sub, sub / "d", sub / "d/e", sub / "d/f", sub / "d/f/file", sub / "d/link"]
    made += [sub / "single", sub / "g", sub / "g/h"]
    for path in made:
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == OWNER, path
    assert stat.S_IMODE(os.stat(sub / "d/e").st_mode) == 0o750
    assert stat.S_IMODE(os.stat(sub / "g/h").st_mode) == 0o700
    assert os.stat(tmp_path / "root" / "theirs").st_uid == 1900200


def test_writes_land_inside(tree) -> None:  # type: ignore[no-untyped-def]
    safe, root, _ = tree
    fd, pfd, tmp, name = safe.create_temp("d/e/f", 1)
    os.write(fd, b"data")
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    os.close(pfd)
    assert (root / "d" / "e" / "f").read_bytes() == b"data"
    assert safe.remove("d") is False  # not empty: kept
    assert safe.remove("d/e/f") and safe.remove("d/e") and safe.remove("d")
