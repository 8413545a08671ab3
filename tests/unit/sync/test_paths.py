"""Safe resolution: nothing reaches outside the root, whatever the names or planted symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offload.sync.paths import PathRefused, SafeRoot, check_link_target, split_rel


@pytest.mark.parametrize(
    "rel", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a\0b"]
)
def test_paths_that_are_not_plain_relative_names_are_refused(rel: str) -> None:
    with pytest.raises(PathRefused):
        split_rel(rel)


@pytest.mark.parametrize(
    ("rel", "target"),
    [("x", "y"), ("a/x", "../y"), ("a/b/x", "../../c/d"), ("x", "./sub/y"), ("a/x", "..")],
)
def test_links_that_stay_inside_are_allowed(rel: str, target: str) -> None:
    check_link_target(rel, target)


@pytest.mark.parametrize(
    ("rel", "target"),
    [
        ("x", "/etc/passwd"),
        ("x", ".."),
        ("a/x", "../../y"),
        ("x", "a/../../y"),
        ("a/x", "b/../.."),
        ("x", ""),
    ],
)
def test_links_that_could_leave_are_refused(rel: str, target: str) -> None:
    with pytest.raises(PathRefused):
        check_link_target(rel, target)


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


def test_symlink_creation_checks_the_target(tree) -> None:  # type: ignore[no-untyped-def]
    safe, root, _ = tree
    safe.symlink("a/ok", "../b", 1)
    assert os.readlink(root / "a" / "ok") == "../b"
    with pytest.raises(PathRefused):
        safe.symlink("a/evil", "../../outside/secret", 2)
    assert not (root / "a" / "evil").exists()


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
