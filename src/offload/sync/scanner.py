"""Manifests: every synced path under a root with its type, size, mtime, mode and link target.

The walk goes through directory descriptors (`os.scandir(fd)` and `O_NOFOLLOW` opens), never
through path strings, so a directory swapped for a symlink mid-walk is skipped rather than
followed out of the root. Hashes are computed only when asked (same size, different mtime).
Blocking: call from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from offload.sync.ignore import IgnoreRules
from offload.sync.paths import PathRefused, SafeRoot, entry_from_stat, stat_entry
from offload.sync.protocol import CHUNK_SIZE, Entry

Manifest = dict[str, Entry]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def scan(root: SafeRoot, ignore: IgnoreRules, under: str = "") -> Manifest:
    """Every non-ignored entry below `under` ("" = the whole root), keyed by relative path."""
    manifest: Manifest = {}
    if under:
        entry = root.entry(under)
        if entry is None or ignore.ignored(under):
            return manifest
        manifest[under] = entry
        if entry.kind != "d" or ignore.prune(under):
            return manifest
        try:
            with root.directory(under) as fd:
                _walk(fd, under + "/", ignore, manifest)
        except (FileNotFoundError, NotADirectoryError, PathRefused):
            pass  # gone, or swapped for a symlink since: the watcher reports what is there now
        return manifest
    _walk(root.fd, "", ignore, manifest)
    return manifest


def _walk(dir_fd: int, prefix: str, ignore: IgnoreRules, out: Manifest) -> None:
    subdirs: list[str] = []
    try:
        with os.scandir(dir_fd) as it:
            for item in it:
                rel = prefix + item.name
                try:
                    st = item.stat(follow_symlinks=False)
                    target = None
                    if stat.S_ISLNK(st.st_mode):
                        st, target = stat_entry(dir_fd, item.name)
                except FileNotFoundError:
                    continue  # removed while we looked
                except OSError as exc:
                    if exc.errno != errno.EAGAIN:
                        raise
                    continue  # swapped back and forth while we looked: the watcher says so
                is_dir = stat.S_ISDIR(st.st_mode)
                if ignore.ignored(rel):
                    if is_dir and not ignore.prune(rel):
                        subdirs.append(item.name)
                    continue
                entry = entry_from_stat(st, target)
                if entry is None:
                    continue  # sockets, fifos, devices: never synced
                out[rel] = entry
                if is_dir:
                    subdirs.append(item.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in subdirs:
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                continue  # gone, or swapped for a symlink: not followed
            raise
        try:
            _walk(fd, prefix + name + "/", ignore, out)
        finally:
            os.close(fd)


def hash_file(root: SafeRoot, rel: str) -> str | None:
    """sha256 of the regular file `rel`, streamed; None if it is not a regular file any more."""
    try:
        fd = root.open_read(rel)
    except (OSError, PathRefused):
        return None
    digest = hashlib.sha256()
    try:
        while chunk := os.read(fd, CHUNK_SIZE):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()
