"""Safe resolution of relative paths inside one root directory, openat-style.

Every operation walks from the root's directory descriptor one component at a time with
`O_NOFOLLOW | O_DIRECTORY`, so a symlink anywhere in the intermediate components is refused
(`PathRefused`) instead of followed; the last component is acted on through its parent's
descriptor without following it either (`*at(..., AT_SYMLINK_NOFOLLOW)`, `O_NOFOLLOW`, and
`renameat`, which replaces a symlink rather than writing through it). Paths themselves must be
relative, with no empty, `.` or `..` component. Whatever a container swaps in between two
system calls, each call resolves only real directories reached from the root, so the race has
nothing to win: the worst it gets is an error for that path.

Why descriptor walks and not `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: the walk gives
the same guarantee (no `..` is ever passed to the kernel, and no component is followed), works
on every kernel and libc Python runs on, and the operations on the last component (mkdirat,
symlinkat, renameat, unlinkat, fchownat) have no openat2 form anyway, so they need the parent's
descriptor either way. A descriptor stays inside the root even if its directory is renamed
meanwhile, because a rename cannot leave the mount it happens in, and the mount area is its own
bind mount wherever a container or an engine sees it.

Symlinks are written with whatever target the other side has (absolute, climbing out,
dangling): as with a local bind mount, a link is resolved by whoever opens it in a container,
never by the sync, which only ever reads and writes the link itself.

`owner` (the runner's `area_owner`): the uid/gid given to everything this module creates, so
that root in the engine's sandbox, an unprivileged host uid, can change and delete it. Modes
are set explicitly (umask does not decide them), after the owner.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from offload.core.errors import PermissionDenied
from offload.sync.protocol import TEMP_PREFIX, Entry

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_NAME = 255
_MAX_PATH = 4096

_STAT_TRIES = 5

Owner = tuple[int, int]  # uid, gid


class PathRefused(PermissionDenied):
    """A path or symlink that would leave the synced root: refused, logged, never acted on."""

    code = "path_refused"
    default_fix = (
        "Keep synced files inside the mounted directory: no `..`, no absolute paths, and no "
        "symlink where the other side has a directory."
    )


def split_rel(rel: str) -> list[str]:
    """The components of a relative path, or PathRefused."""
    if not isinstance(rel, str) or not rel or len(rel) > _MAX_PATH:
        raise PathRefused(f"refused path {rel!r}: empty or too long")
    if rel.startswith("/") or "\0" in rel:
        raise PathRefused(f"refused path {rel!r}: absolute or with a NUL byte")
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", "..") or len(part.encode(errors="surrogateescape")) > _MAX_NAME:
            raise PathRefused(f"refused path {rel!r}: `{part}` is not a plain name")
    return parts


def entry_from_stat(st: os.stat_result, target: str | None = None) -> Entry | None:
    """The sync entry of a stat result; None for what is never synced (sockets, devices, fifos)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return Entry("f", st.st_size, st.st_mtime_ns, stat.S_IMODE(mode) & 0o777)
    if stat.S_ISDIR(mode):
        return Entry("d", 0, 0, stat.S_IMODE(mode) & 0o777)
    if stat.S_ISLNK(mode):
        return Entry("l", 0, 0, 0, target)
    return None


def stat_entry(dir_fd: int, name: str) -> tuple[os.stat_result, str | None]:
    """lstat of `name` in `dir_fd`, with its target if it is a symlink.

    The two calls race with whoever swaps the name (a link for a directory and back): a
    readlink that finds no link any more looks again, a few times, then gives up with EAGAIN.
    """
    for _ in range(_STAT_TRIES):
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            return st, None
        try:
            return st, os.readlink(name, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not a symlink (any more)
                raise
    raise OSError(errno.EAGAIN, f"{name!r} keeps changing between a symlink and something else")


class SafeRoot:
    """A directory opened once; every path below it is reached without following symlinks."""

    def __init__(self, path: Path, fd: int | None = None, *, owner: Owner | None = None) -> None:
        self.path = Path(path)
        self.fd = fd if fd is not None else os.open(self.path, _DIR_FLAGS)
        self.owner = owner  # given to what is created below; None: the process's own
        # Per thread, during a batch: directory descriptors already walked to (see `batch`).
        self._local = threading.local()

    @classmethod
    def open_child(cls, parent: SafeRoot, name: str, create: bool = True) -> SafeRoot:
        """`parent/name` as a root of its own (a plain name, never a symlink)."""
        split_rel(name)
        if "/" in name:
            raise PathRefused(f"refused root {name!r}: not a single name")
        fd = parent._make_dir(parent.fd, name, name, create)
        return cls(parent.path / name, fd, owner=parent.owner)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SafeRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- walking --------------------------------------------------------------------------

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Reuse the directories walked to until the end of the block (this thread only).

        Thousands of files in one directory then cost one walk instead of one each. Safe: a
        cached descriptor is a real directory reached without following links; if a container
        renames it meanwhile it still lies inside the mount area (see the module's docstring).
        Removing or moving a directory through this object drops it (and what lies below) from
        the cache.
        """
        if getattr(self._local, "cache", None) is not None:
            yield
            return
        self._local.cache = {}
        try:
            yield
        finally:
            cache, self._local.cache = self._local.cache, None
            for fd in cache.values():
                os.close(fd)

    def _cached_dir(self, parts: list[str], create: bool) -> int:
        cache: dict[str, int] = self._local.cache
        key = "/".join(parts)
        fd = cache.get(key)
        if fd is not None:
            return fd
        parent = self._cached_dir(parts[:-1], create) if len(parts) > 1 else self.fd
        fd = self._make_dir(parent, parts[-1], key, create)
        cache[key] = fd
        return fd

    def _make_dir(self, dir_fd: int, name: str, rel: str, create: bool) -> int:
        """A descriptor of the directory `name` in `dir_fd`, made (and owned) if asked and missing."""
        created = False
        if create:
            try:
                os.mkdir(name, 0o755, dir_fd=dir_fd)
                created = True
            except FileExistsError:
                pass
        fd = _open_dir(dir_fd, name, rel)
        if created:
            try:
                self._own(fd)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _own(self, fd: int) -> None:
        """Give what `fd` is (just created here) to `owner`: through the descriptor, no race."""
        if self.owner is not None:
            os.fchown(fd, *self.owner)

    def _forget(self, rel: str) -> None:
        cache: dict[str, int] | None = getattr(self._local, "cache", None)
        if not cache:
            return
        prefix = rel + "/"
        for key in [k for k in cache if k == rel or k.startswith(prefix)]:
            os.close(cache.pop(key))

    @contextmanager
    def parent(self, rel: str, create: bool = False) -> Iterator[tuple[int, str]]:
        """(descriptor of rel's directory, last name); creates missing directories if asked."""
        parts = split_rel(rel)
        if getattr(self._local, "cache", None) is not None:
            yield (self._cached_dir(parts[:-1], create) if len(parts) > 1 else self.fd), parts[-1]
            return
        fd = self.fd
        opened: list[int] = []
        try:
            for i, part in enumerate(parts[:-1]):
                fd = self._make_dir(fd, part, "/".join(parts[: i + 1]), create)
                opened.append(fd)
            yield fd, parts[-1]
        finally:
            for d in reversed(opened):
                os.close(d)

    @contextmanager
    def directory(self, rel: str) -> Iterator[int]:
        """A descriptor of the directory `rel` ("" is the root itself)."""
        if not rel:
            yield self.fd
            return
        with self.parent(rel) as (pfd, name):
            fd = _open_dir(pfd, name, rel)
            try:
                yield fd
            finally:
                os.close(fd)

    # ---- reading --------------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            with self.parent(rel) as (pfd, name):
                return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def entry(self, rel: str) -> Entry | None:
        """What `rel` is now, or None if nothing (or nothing syncable) is there."""
        try:
            with self.parent(rel) as (pfd, name):
                st, target = stat_entry(pfd, name)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return entry_from_stat(st, target)

    def open_read(self, rel: str) -> int:
        """A read descriptor on the regular file `rel`; a symlink there is refused, not followed."""
        with self.parent(rel) as (pfd, name):
            try:
                fd = os.open(
                    name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=pfd
                )
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _refused(self, rel, "is a symlink, not a file") from None
                raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _refused(self, rel, "is not a regular file")
        return fd

    # ---- writing --------------------------------------------------------------------------

    def create_temp(self, rel: str, counter: int) -> tuple[int, int, str, str]:
        """(file fd, parent fd, temp name, final name): a new file next to `rel`, to rename over it."""
        with self.parent(rel, create=True) as (pfd, name):
            own_pfd = os.dup(pfd)
        tmp = _temp_name(counter)
        fd = -1
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=own_pfd,
            )
            self._own(fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
                _unlink_quietly(tmp, own_pfd)
            os.close(own_pfd)
            raise
        return fd, own_pfd, tmp, name

    def open_in_place(self, rel: str) -> tuple[int, int, str]:
        """(file fd, parent fd, name): `rel` truncated for writing in place (single-file mounts).

        The file keeps its inode (a single-file bind mount holds it) and becomes `owner`'s, like
        every file the sync writes. `O_NONBLOCK`: a fifo planted there must not hang the sync.
        """
        with self.parent(rel, create=True) as (pfd, name):
            own_pfd = os.dup(pfd)
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                0o600,
                dir_fd=own_pfd,
            )
        except OSError as exc:
            os.close(own_pfd)
            if exc.errno == errno.ELOOP:
                raise _refused(self, rel, "is a symlink, not a file") from None
            if exc.errno == errno.ENXIO:
                raise _refused(self, rel, "is not a regular file") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _refused(self, rel, "is not a regular file")
            self._own(fd)
            os.ftruncate(fd, 0)
        except BaseException:
            os.close(fd)
            os.close(own_pfd)
            raise
        return fd, own_pfd, name

    def mkdir(self, rel: str, mode: int) -> None:
        with self.parent(rel, create=True) as (pfd, name):
            created = True
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                created = False
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    raise
            fd = _open_dir(pfd, name, rel)
            try:
                if created:
                    self._own(fd)
                os.fchmod(fd, mode & 0o777)
            finally:
                os.close(fd)

    def symlink(self, rel: str, target: str, counter: int) -> None:
        """Create or replace the symlink `rel` (atomically) with exactly this target text.

        Any target is fine, absolute, climbing out or dangling: nothing here ever resolves it.
        """
        if not target or "\0" in target:
            raise PathRefused(f"refused symlink {rel!r}: an empty target or a NUL byte in it")
        with self.parent(rel, create=True) as (pfd, name):
            tmp = _temp_name(counter)
            os.symlink(target, tmp, dir_fd=pfd)
            try:
                if self.owner is not None:  # lchown: the link itself, never what it names
                    os.chown(tmp, *self.owner, dir_fd=pfd, follow_symlinks=False)
                os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            except BaseException:
                _unlink_quietly(tmp, pfd)
                raise

    def set_meta(self, rel: str, mode: int, mtime_ns: int | None) -> None:
        """Permission bits and (files) mtime of `rel`, without following a symlink there."""
        with self.parent(rel) as (pfd, name):
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                return
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            if stat.S_ISDIR(st.st_mode):
                flags |= os.O_DIRECTORY
            fd = os.open(name, flags, dir_fd=pfd)
            try:
                if stat.S_IFMT(os.fstat(fd).st_mode) != stat.S_IFMT(st.st_mode):
                    return  # swapped meanwhile: the watcher reports what is there now
                os.fchmod(fd, mode & 0o777)
                if mtime_ns is not None and stat.S_ISREG(st.st_mode):
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)

    def remove(self, rel: str) -> bool:
        """Remove a file, symlink or *empty* directory; False if a non-empty directory stays."""
        self._forget(rel)
        with self.parent(rel) as (pfd, name):
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                return True
            try:
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    return False
                raise
        return True

    def move_out(self, rel: str, dest: SafeRoot, dest_name: str) -> None:
        """Rename `rel` to `dest/dest_name` (same filesystem): how a conflict is kept aside."""
        split_rel(dest_name)
        self._forget(rel)
        with self.parent(rel) as (pfd, name):
            os.rename(name, dest_name, src_dir_fd=pfd, dst_dir_fd=dest.fd)

    def names(self, rel: str) -> list[str]:
        """The names in directory `rel` (empty if it is gone)."""
        try:
            with self.directory(rel) as fd:
                return os.listdir(fd)
        except (FileNotFoundError, NotADirectoryError):
            return []


def _open_dir(dir_fd: int, name: str, rel: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if stat.S_ISLNK(st.st_mode):
                raise PathRefused(
                    f"refused path {rel!r}: a symlink stands where a directory is expected"
                ) from None
        raise


def _refused(root: SafeRoot, rel: str, why: str) -> PathRefused:
    return PathRefused(f"refused path {rel!r}: {why}")


def _temp_name(counter: int) -> str:
    # Unpredictable: a container cannot plant something at the name before it is created.
    return f"{TEMP_PREFIX}{os.getpid()}-{counter}-{secrets.token_hex(4)}"


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
