"""The runner's kept `docker save` archives (`export_cache`) on a real filesystem: kept by image
id, the least recently used out first beyond the limit, nothing kept when off or too large, and
never a path from an id."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from offload.runner.export_cache import ExportCache

MiB = 1024 * 1024


def _staged(cache: ExportCache, size: int) -> Path:
    staged = cache.staging()
    staged.write_bytes(b"x" * size)
    return staged


def _id(n: int) -> str:
    return "sha256:" + f"{n:x}" * 64


def test_an_archive_kept_is_found_by_its_image_id(tmp_path: Path) -> None:
    cache = ExportCache(tmp_path / "exports", 10 * MiB)
    assert cache.lookup(_id(1)) is None
    assert cache.keep(_id(1), _staged(cache, MiB))
    found = cache.lookup(_id(1))
    assert found is not None and found.stat().st_size == MiB
    assert (tmp_path / "exports").stat().st_mode & 0o777 == 0o700  # the runner's alone
    assert cache.lookup(_id(2)) is None


def test_the_least_recently_used_leave_first_beyond_the_limit(tmp_path: Path) -> None:
    cache = ExportCache(tmp_path / "exports", 3 * MiB)
    for n in (1, 2, 3):
        assert cache.keep(_id(n), _staged(cache, MiB))
        os.utime(tmp_path / "exports" / f"{_id(n)[7:]}.tar", ns=(n * 10**9, n * 10**9))
    assert cache.lookup(_id(1)) is not None  # used now: the newest
    assert cache.keep(_id(4), _staged(cache, MiB))
    assert cache.lookup(_id(2)) is None  # the oldest use left
    assert all(cache.lookup(_id(n)) is not None for n in (1, 3, 4))
    assert cache.size_bytes() == 3 * MiB
    assert not any(p.name.startswith(".staging-") for p in (tmp_path / "exports").iterdir())


def test_nothing_is_kept_when_off_or_larger_than_the_limit(tmp_path: Path) -> None:
    off = ExportCache(tmp_path / "off", 0)
    staged = _staged(off, MiB)
    assert not off.keep(_id(1), staged) and not staged.exists()
    small = ExportCache(tmp_path / "small", MiB)
    staged = _staged(small, 2 * MiB)
    assert not small.keep(_id(1), staged) and not staged.exists()
    assert small.size_bytes() == 0


def test_drop_and_clear(tmp_path: Path) -> None:
    cache = ExportCache(tmp_path / "exports", 10 * MiB)
    cache.keep(_id(1), _staged(cache, 10))
    cache.keep(_id(2), _staged(cache, 10))
    cache.drop(_id(1))
    assert cache.lookup(_id(1)) is None and cache.lookup(_id(2)) is not None
    cache.clear()
    assert not (tmp_path / "exports").exists() and cache.lookup(_id(2)) is None


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:a/b", "sha256:", "../x"])
def test_an_id_is_never_a_path(tmp_path: Path, bad: str) -> None:
    cache = ExportCache(tmp_path / "exports", MiB)
    with pytest.raises(ValueError, match="not an image id"):
        cache.lookup(bad)
