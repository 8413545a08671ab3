"""One side of a sync session, shared by the laptop and the runner.

A peer applies the other side's changes to its root and sends its own. Its state is `base`:
per path, the entry both sides agreed on last. A local change is whatever differs from `base`
(so applying the peer's change, which updates `base`, never echoes back); an incoming change
carries `expect`, the entry the sender believed this side has, and differs from what is really
here only when both sides changed the same path: a conflict. What a conflict does is the
subclass's choice (`_on_conflict`): the laptop keeps its version, the runner keeps its own aside
and takes the laptop's.

Threads: every file-system operation of one peer runs, in order, on the peer's one worker
thread, so detecting a change and applying an incoming one never race. The event loop only
moves frames. Readers never wait for the writer to drain (that would deadlock two peers that
both send); replies are queued while a multi-frame transfer is in progress.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from offload.sync.ignore import IgnoreRules
from offload.sync.paths import PathRefused, SafeRoot, split_rel
from offload.sync.protocol import (
    CHUNK_SIZE,
    READ_SIZE,
    SMALL_FILE_MAX,
    ByteWriter,
    Entry,
    Frame,
    FrameParser,
    Kind,
    ProtocolError,
    decode_json,
    frame,
    jframe,
    same,
    small_file_frame,
    split_small_file,
    wire,
)
from offload.sync.scanner import Manifest, hash_file, scan

log = logging.getLogger(__name__)

# Frames handed to the worker thread in order with the file system; the rest is loop business.
_APPLIED = {
    Kind.MKDIR,
    Kind.SYMLINK,
    Kind.FILE_BEGIN,
    Kind.FILE_DATA,
    Kind.FILE_END,
    Kind.FILE_SMALL,
    Kind.DELETE,
    Kind.META,
    Kind.HASH_REQ,
    Kind.BARRIER,
}
SEND_BATCH = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Op:
    """A local change to send: kind is delete | mkdir | symlink | file | meta."""

    kind: str
    rel: str
    entry: Entry | None
    expect: Entry | None


@dataclass(frozen=True, slots=True)
class Report:
    """Something the worker thread tells the loop: error | conflict | recheck | need."""

    kind: str
    rel: str
    detail: str = ""


Output = bytes | Report


class _Incoming:
    """A file being received: its temporary file until FILE_END renames it into place."""

    def __init__(self, rel: str, expect: Entry | None) -> None:
        self.rel = rel
        self.expect = expect
        self.fd = -1
        self.pfd = -1
        self.tmp: str | None = None  # None: written in place
        self.name = ""
        self.discard = False


class SyncPeer:
    def __init__(
        self,
        root: SafeRoot,
        ignore: IgnoreRules,
        writer: ByteWriter,
        *,
        name: str,
        in_place: bool = False,
    ) -> None:
        self.root = root
        self.ignore = ignore
        self.writer = writer
        self.name = name
        self.in_place = in_place
        self.base: Manifest = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"offload-sync-{name}")
        self._incoming: _Incoming | None = None
        self._counter = 0
        # loop side
        self._deferred: list[bytes] = []
        self._sending = False
        self._dirty: set[str] = set()
        self._forced: dict[str, Entry | None] = {}  # path -> the expect to send it with
        self._dirty_event = asyncio.Event()
        self._barrier_seq = 0
        self._barriers: dict[int, asyncio.Future[None]] = {}
        self._unacked: dict[int, int] = {}  # barrier seq -> changes it confirms
        self._send_lock = asyncio.Lock()
        self._quiet = asyncio.Event()  # set while no local change waits to be sent
        self._quiet.set()
        self.closed = asyncio.Event()
        self.changes_sent = 0
        self.changes_applied = 0

    # ---- running --------------------------------------------------------------------------

    async def run(
        self, reader: Any, parser: FrameParser, pending: list[Frame], send: bool = True
    ) -> None:
        """Receive until EOF (and send local changes meanwhile when `send`)."""
        sender = asyncio.get_running_loop().create_task(self._send_loop()) if send else None
        try:
            if pending:
                await self._receive(pending)
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                frames = parser.feed(data)
                if frames:
                    await self._receive(frames)
        finally:
            self.closed.set()
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            for fut in self._barriers.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the sync stream closed"))

    async def shutdown(self) -> None:
        """Release the worker thread and any half-received file."""
        await asyncio.get_running_loop().run_in_executor(self.executor, self._abort_incoming)
        self.executor.shutdown(wait=True)

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn` on the peer's worker thread (in order with every other file operation)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- receiving ------------------------------------------------------------------------

    async def _receive(self, frames: list[Frame]) -> None:
        run: list[Frame] = []
        for item in frames:
            if item[0] in _APPLIED:
                run.append(item)
                continue
            if run:
                await self._apply_run(run)
                run = []
            self._control(*item)
        if run:
            await self._apply_run(run)

    async def _apply_run(self, frames: list[Frame]) -> None:
        outputs = await self.call(self._apply_all, frames)
        self._handle_outputs(outputs)

    def _handle_outputs(self, outputs: Iterable[Output]) -> None:
        for out in outputs:
            if isinstance(out, bytes):
                self.send_reply(out)
            elif out.kind == "recheck":
                self.mark_dirty({out.rel})
            elif out.kind == "need":
                self.send_reply(jframe(Kind.NEED, {"p": out.rel}))
            elif out.kind == "error":
                self.on_error(out.rel, out.detail)
            elif out.kind == "conflict":
                self.on_conflict(out.rel, out.detail)

    def _control(self, kind: Kind, payload: bytes) -> None:
        msg = decode_json(payload) if payload else {}
        if kind == Kind.BARRIER_ACK:
            seq = int(msg.get("seq", 0))
            self._unacked.pop(seq, None)
            fut = self._barriers.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == Kind.NEED:
            self.mark_dirty({msg["p"]}, force=True)
        elif kind == Kind.PULL:
            # Each path with what the laptop has there, so that the laptop takes it.
            wanted = {str(p): Entry.from_wire(e) for p, e in msg.get("paths", [])}
            self.mark_dirty(set(wanted), force=True, expects=wanted)
        elif kind == Kind.ERROR:
            self.on_error(str(msg.get("p", "")), str(msg.get("message", "")))
        elif kind == Kind.CONFLICT:
            self.on_conflict(str(msg.get("p", "")), str(msg.get("kept_at", "")))
        else:
            raise ProtocolError(f"unexpected {kind.name} frame")

    # hooks ----------------------------------------------------------------------------------

    def on_error(self, rel: str, message: str) -> None:
        """An error applying or reading `rel` (already logged where it happened)."""

    def on_conflict(self, rel: str, kept_at: str) -> None:
        log.warning("sync %s: conflict on %s (other version kept at %s)", self.name, rel, kept_at)

    def _meta_mismatch(self, rel: str, out: list[Output]) -> None:
        """A metadata change for content that moved on here: ask for the whole thing."""
        out.append(Report("need", rel))

    def _on_conflict(self, rel: str, current: Entry, out: list[Output]) -> bool:
        """Both sides changed `rel`; True: go on and take the incoming change."""
        raise NotImplementedError

    # ---- applying (worker thread) -----------------------------------------------------------

    def _apply_all(self, frames: list[Frame]) -> list[Output]:
        with self.root.batch():
            return self._apply_frames(frames)

    def _apply_frames(self, frames: list[Frame]) -> list[Output]:
        out: list[Output] = []
        for kind, payload in frames:
            rel = ""
            try:
                if kind == Kind.FILE_DATA:
                    self._file_data(payload)
                    continue
                if kind == Kind.FILE_SMALL:
                    header, content = split_small_file(payload)
                    rel = str(header.get("p", ""))
                    if self._file_begin(header, out):
                        self._file_data(content)
                        self._file_end(header, out)
                    continue
                msg = decode_json(payload)
                rel = str(msg.get("p", ""))
                self._apply_one(kind, msg, out)
            except PathRefused as exc:
                log.warning("sync %s: %s", self.name, exc.message)
                self._failed(kind, rel)
                out.append(Report("error", rel, exc.message))
            except OSError as exc:
                message = f"{exc.strerror or exc} ({_errname(exc)})"
                log.warning("sync %s: %s: %s", self.name, rel, message)
                self._failed(kind, rel)
                out.append(Report("error", rel, message))
        return out

    def _failed(self, kind: Kind, rel: str) -> None:
        """Drop a half-received file; the rest of its frames are skipped until its end."""
        incoming = self._incoming
        self._abort_incoming()
        if kind in (Kind.FILE_BEGIN, Kind.FILE_DATA):
            skip = _Incoming(incoming.rel if incoming else rel, None)
            skip.discard = True
            self._incoming = skip

    def _apply_one(self, kind: Kind, msg: dict[str, Any], out: list[Output]) -> None:
        if kind == Kind.BARRIER:
            out.append(jframe(Kind.BARRIER_ACK, {"seq": msg.get("seq")}))
        elif kind == Kind.FILE_BEGIN:
            self._file_begin(msg, out)
        elif kind == Kind.FILE_END:
            self._file_end(msg, out)
        elif kind == Kind.MKDIR:
            self._mkdir(msg, out)
        elif kind == Kind.SYMLINK:
            self._symlink(msg, out)
        elif kind == Kind.DELETE:
            self._delete(msg, out)
        elif kind == Kind.META:
            self._meta(msg, out)
        elif kind == Kind.HASH_REQ:
            out.append(jframe(Kind.HASH_REPLY, {"hashes": self._hashes(msg.get("paths", []))}))

    def _prepare(self, msg: dict[str, Any], out: list[Output], new_kind: str) -> str | None:
        """The checked path of an incoming change, or None to skip it (ignored, conflict lost)."""
        rel = msg.get("p")
        if not isinstance(rel, str):
            raise ProtocolError("change without a path")
        split_rel(rel)
        if self.ignore.ignored(rel):
            return None
        self.changes_applied += 1
        expect = Entry.from_wire(msg.get("expect"))
        current = self.root.entry(rel)
        if current is None:
            return rel
        conflict = not same(current, expect)
        if not conflict and current.kind == "d" and new_kind != "d":
            conflict = bool(self.root.names(rel))  # a directory with content the sender lacks
            if not conflict:
                self.root.remove(rel)
        if conflict and not self._on_conflict(rel, current, out):
            return None
        return rel

    def _file_begin(self, msg: dict[str, Any], out: list[Output]) -> bool:
        self._abort_incoming()
        rel = self._prepare(msg, out, "f")
        incoming = _Incoming(str(msg.get("p")), None)
        self._incoming = incoming
        if rel is None:
            incoming.discard = True
            return True
        self._counter += 1
        if self.in_place:
            incoming.fd, incoming.pfd, incoming.name = self.root.open_in_place(rel)
        else:
            incoming.fd, incoming.pfd, incoming.tmp, incoming.name = self.root.create_temp(
                rel, self._counter
            )
        return True

    def _file_data(self, data: bytes | memoryview) -> None:
        incoming = self._incoming
        if incoming is None:
            raise ProtocolError("file data outside a file")
        if incoming.discard:
            return
        view = memoryview(data)
        while view:
            written = os.write(incoming.fd, view)
            view = view[written:]

    def _file_end(self, msg: dict[str, Any], out: list[Output]) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            raise ProtocolError("end of a file that never began")
        if incoming.discard:
            return
        try:
            mtime_ns = int(msg["mtime_ns"])
            os.fchmod(incoming.fd, int(msg["mode"]) & 0o777)
            os.utime(incoming.fd, ns=(mtime_ns, mtime_ns))
            st = os.fstat(incoming.fd)
            if incoming.tmp is not None:
                os.rename(
                    incoming.tmp, incoming.name, src_dir_fd=incoming.pfd, dst_dir_fd=incoming.pfd
                )
                incoming.tmp = None
            self.base[incoming.rel] = Entry("f", st.st_size, st.st_mtime_ns, st.st_mode & 0o777)
        finally:
            _close_incoming(incoming)

    def _abort_incoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is not None:
            _close_incoming(incoming)

    def _mkdir(self, msg: dict[str, Any], out: list[Output]) -> None:
        rel = self._prepare(msg, out, "d")
        if rel is None:
            return
        current = self.root.entry(rel)
        if current is not None and current.kind != "d":
            self.root.remove(rel)
        self.root.mkdir(rel, int(msg.get("mode", 0o755)))
        self.base[rel] = self.root.entry(rel) or Entry("d", mode=int(msg.get("mode", 0o755)))

    def _symlink(self, msg: dict[str, Any], out: list[Output]) -> None:
        rel = self._prepare(msg, out, "l")
        if rel is None:
            return
        target = msg.get("target")
        if not isinstance(target, str):
            raise ProtocolError("symlink without a target")
        self._counter += 1
        self.root.symlink(rel, target, self._counter)
        self.base[rel] = Entry("l", target=target)

    def _delete(self, msg: dict[str, Any], out: list[Output]) -> None:
        rel = msg.get("p")
        if not isinstance(rel, str):
            raise ProtocolError("delete without a path")
        split_rel(rel)
        if self.ignore.ignored(rel):
            return
        self.changes_applied += 1
        self.base.pop(rel, None)
        expect = Entry.from_wire(msg.get("expect"))
        current = self.root.entry(rel)
        if current is None:
            return
        both_dirs = current.kind == "d" and expect is not None and expect.kind == "d"
        if not both_dirs and not same(current, expect):
            self._on_conflict(rel, current, out)
            if self.root.entry(rel) is not None:
                out.append(Report("recheck", rel))  # kept here: send it back
            return
        if not self.root.remove(rel):  # a directory with entries the sender never had
            self._on_conflict(rel, current, out)
            if self.root.entry(rel) is not None:
                out.append(Report("recheck", rel))

    def _meta(self, msg: dict[str, Any], out: list[Output]) -> None:
        rel = msg.get("p")
        if not isinstance(rel, str):
            raise ProtocolError("meta without a path")
        split_rel(rel)
        if self.ignore.ignored(rel):
            return
        expect = Entry.from_wire(msg.get("expect"))
        current = self.root.entry(rel)
        if current is None or not same(current, expect):
            self._meta_mismatch(rel, out)
            return
        mtime = msg.get("mtime_ns") if current.kind == "f" else None
        self.root.set_meta(rel, int(msg["mode"]), mtime)
        self.base[rel] = self.root.entry(rel) or current

    def _hashes(self, paths: Any) -> dict[str, str | None]:
        if not isinstance(paths, list):
            raise ProtocolError("hash request without a list of paths")
        hashes: dict[str, str | None] = {}
        for rel in paths:
            try:
                split_rel(rel)
                hashes[rel] = hash_file(self.root, rel)
            except PathRefused:
                hashes[rel] = None
        return hashes

    # ---- sending --------------------------------------------------------------------------

    def send_reply(self, data: bytes) -> None:
        """A control frame: written now, or after the multi-frame transfer in progress."""
        if self._sending:
            self._deferred.append(data)
        else:
            self.writer.write(data)

    def mark_dirty(
        self, paths: set[str], force: bool = False, expects: dict[str, Entry | None] | None = None
    ) -> None:
        """Compare these paths with `base` soon; `force`: send them even if unchanged."""
        if not paths:
            return
        self._dirty |= paths
        self._quiet.clear()
        if force:
            for path in paths:
                self._forced[path] = (expects or {}).get(path)
        self._dirty_event.set()

    @property
    def pending(self) -> int:
        """Changes noticed here and not yet confirmed applied by the other side."""
        return len(self._dirty) + sum(self._unacked.values())

    async def _send_loop(self) -> None:
        while True:
            await self._dirty_event.wait()
            self._dirty_event.clear()
            paths, forced = self._dirty, self._forced
            self._dirty, self._forced = set(), {}
            try:
                ops = await self.call(self._detect_batch, paths, forced)
            except (OSError, PathRefused) as exc:
                # Never let one odd path stop this direction of the sync for good.
                log.warning(
                    "sync %s: looking at %d changed paths failed: %s", self.name, len(paths), exc
                )
                ops = []
            if ops:
                await self.send_ops(ops)
            if not self._dirty:
                self._quiet.set()

    async def settle(self) -> None:
        """Wait until every local change noticed so far is sent and applied by the other side."""
        await self._quiet.wait()
        async with self._send_lock:
            fut = self.barrier()
        await fut

    async def send_ops(self, ops: list[Op], barrier: bool = True) -> asyncio.Future[None] | None:
        """Stream `ops` in order; with `barrier`, a future that resolves once all are applied."""
        async with self._send_lock:
            await self._send_frames(self._frames(ops))
        self.changes_sent += len(ops)
        return self.barrier(len(ops)) if barrier else None

    async def _send_frames(self, frames: Iterator[Output]) -> None:
        self._sending = True
        try:
            while True:
                outputs, done = await self.call(self._take, frames, SEND_BATCH)
                chunk = b"".join(o for o in outputs if isinstance(o, bytes))
                if chunk:
                    self.writer.write(chunk)
                self._handle_outputs(o for o in outputs if not isinstance(o, bytes))
                if done:
                    break
                await self.writer.drain()
        finally:
            self._sending = False
            deferred, self._deferred = self._deferred, []
            for data in deferred:
                self.writer.write(data)

    def barrier(self, confirms: int = 0) -> asyncio.Future[None]:
        """Send a barrier; the future resolves when the other side applied everything before it."""
        self._barrier_seq += 1
        seq = self._barrier_seq
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            fut.set_exception(ConnectionError("the sync stream closed"))
            return fut
        fut.add_done_callback(_retrieve)  # a closed stream fails barriers nobody awaits
        self._barriers[seq] = fut
        if confirms:
            self._unacked[seq] = confirms
        self.send_reply(jframe(Kind.BARRIER, {"seq": seq}))
        return fut

    def _take(self, frames: Iterator[Output], limit: int) -> tuple[list[Output], bool]:
        """Up to about `limit` bytes of frames from the generator (worker thread)."""
        out: list[Output] = []
        size = 0
        with self.root.batch():
            for item in frames:
                out.append(item)
                if isinstance(item, bytes):
                    size += len(item)
                    if size >= limit:
                        return out, False
        return out, True

    # detection (worker thread) ------------------------------------------------------------

    def _detect_batch(self, paths: set[str], forced: dict[str, Entry | None]) -> list[Op]:
        with self.root.batch():
            return self.detect(paths, forced)

    def detect(self, paths: set[str], forced: dict[str, Entry | None] | None = None) -> list[Op]:
        """Ops that bring the other side from `base` to what these paths are now."""
        forced = forced or {}
        deletes: dict[str, Entry] = {}
        adds: dict[str, tuple[Entry, Entry | None]] = {}
        if "" in paths:  # the watcher lost events: compare everything
            paths = (paths - {""}) | set(self.base) | set(scan(self.root, self.ignore))
        for rel in paths:
            if not rel:
                continue
            try:
                split_rel(rel)
            except PathRefused:
                continue
            if self.ignore.ignored(rel):
                continue
            try:
                current = self.root.entry(rel)
            except PathRefused:
                current = None  # under a symlink now: for this tree, it is gone
            except OSError as exc:
                # Changing while we looked (a directory swapped for a link and back): the
                # change that raced us is reported by the watcher, and looked at again then.
                log.info("sync %s: %s changed while being read (%s)", self.name, rel, exc)
                continue
            old = self.base.get(rel)
            force = rel in forced
            if current is None:
                if old is not None:
                    deletes.update(self._subtree(rel))
                continue
            if old is not None and old.kind == "d" and current.kind != "d":
                deletes.update({p: e for p, e in self._subtree(rel).items() if p != rel})
            if current.kind == "d" and (old is None or old.kind != "d" or force):
                for sub, entry in scan(self.root, self.ignore, under=rel).items():
                    prior = forced[rel] if force and sub == rel else self.base.get(sub)
                    if not entry.same(prior) or force:
                        adds[sub] = (entry, prior)
            elif force or not current.same(old):
                adds[rel] = (current, forced[rel] if force else old)
        ops = [Op("delete", p, None, e) for p, e in sorted(deletes.items(), key=_deepest_first)]
        for op in ops:
            self.base.pop(op.rel, None)
        for rel in sorted(adds):
            entry, old = adds[rel]
            ops.append(self._op_for(rel, entry, old))
        return ops

    def _subtree(self, rel: str) -> dict[str, Entry]:
        prefix = rel + "/"
        found = {p: e for p, e in self.base.items() if p.startswith(prefix)}
        if rel in self.base:
            found[rel] = self.base[rel]
        return found

    def _op_for(self, rel: str, entry: Entry, old: Entry | None) -> Op:
        if entry.kind == "d":
            kind = "meta" if old is not None and old.kind == "d" else "mkdir"
            self.base[rel] = entry
        elif entry.kind == "l":
            kind = "symlink"
            self.base[rel] = entry
        elif (
            old is not None
            and old.kind == "f"
            and (old.size, old.mtime_ns)
            == (
                entry.size,
                entry.mtime_ns,
            )
        ):
            kind = "meta"
            self.base[rel] = entry
        else:
            kind = "file"  # base is set once the content is read
        return Op(kind, rel, entry, old)

    def _frames(self, ops: list[Op]) -> Iterator[Output]:
        for op in ops:
            head: dict[str, Any] = {"p": op.rel, "expect": wire(op.expect)}
            entry = op.entry
            if op.kind == "delete":
                yield jframe(Kind.DELETE, head)
            elif op.kind == "mkdir" and entry is not None:
                yield jframe(Kind.MKDIR, {**head, "mode": entry.mode})
            elif op.kind == "symlink" and entry is not None:
                yield jframe(Kind.SYMLINK, {**head, "target": entry.target})
            elif op.kind == "meta" and entry is not None:
                yield jframe(Kind.META, {**head, "mode": entry.mode, "mtime_ns": entry.mtime_ns})
            elif op.kind == "file":
                yield from self._file_frames(op.rel, head)

    def _file_frames(self, rel: str, head: dict[str, Any]) -> Iterator[Output]:
        try:
            fd = self.root.open_read(rel)
        except FileNotFoundError:
            yield Report("recheck", rel)  # gone meanwhile: the recheck sends the delete
            return
        except (PathRefused, OSError) as exc:
            swapped = isinstance(exc, PathRefused) or (
                exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EAGAIN)
            )  # a link or a directory there now: look again, and send what it is
            yield Report("recheck", rel) if swapped else Report("error", rel, f"cannot read: {exc}")
            return
        try:
            before = os.fstat(fd)
            first = _read_up_to(fd, SMALL_FILE_MAX + 1)
            mode = before.st_mode & 0o777
            tail = {"mode": mode, "mtime_ns": before.st_mtime_ns}
            if len(first) <= SMALL_FILE_MAX:
                yield small_file_frame({**head, **tail}, first)
                size = len(first)
            else:
                yield jframe(Kind.FILE_BEGIN, head)
                size = len(first)
                yield frame(Kind.FILE_DATA, first)
                while chunk := _read_up_to(fd, CHUNK_SIZE):
                    size += len(chunk)
                    yield frame(Kind.FILE_DATA, chunk)
                yield jframe(Kind.FILE_END, tail)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        self.base[rel] = Entry("f", size, before.st_mtime_ns, mode)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (
            size != before.st_size
        ):
            yield Report("recheck", rel)  # written while we read: send it again


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _read_up_to(fd: int, n: int) -> bytes:
    parts: list[bytes] = []
    left = n
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _close_incoming(incoming: _Incoming) -> None:
    if incoming.fd >= 0:
        os.close(incoming.fd)
        incoming.fd = -1
    if incoming.tmp is not None and incoming.pfd >= 0:
        try:
            os.unlink(incoming.tmp, dir_fd=incoming.pfd)
        except FileNotFoundError:
            pass
        incoming.tmp = None
    if incoming.pfd >= 0:
        os.close(incoming.pfd)
        incoming.pfd = -1


def _deepest_first(item: tuple[str, Entry]) -> tuple[int, str]:
    return (-item[0].count("/"), item[0])


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, "error")
