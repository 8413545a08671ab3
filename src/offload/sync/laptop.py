"""The laptop side of file sync: one `LaptopSync` per bind-mounted directory, a `SyncManager`
for all of a session's.

`LaptopSync.start()` returns once the initial sync is complete, which is what a container
create waits for: the runner's manifest is compared with the laptop's tree (and with what both
sides agreed on before a reconnect), differences are streamed in one pipelined batch, and one
barrier round trip confirms that everything is applied. After that a watcher on each side sends
changes as they happen; the stream reconnects (and reconciles again) when the tunnel drops.

The laptop wins every conflict: it never overwrites its own unsynced change with the runner's,
and the runner keeps its overwritten version aside (reported in `status().conflicts`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from offload.core.errors import OffloadError, Suspended, Unreachable
from offload.core.waiting import wait_event
from offload.sync.ignore import IgnoreRules
from offload.sync.paths import SafeRoot
from offload.sync.peer import Op, Output, Report, SyncPeer
from offload.sync.protocol import (
    PROTOCOL_VERSION,
    ByteReader,
    ByteWriter,
    Entry,
    Frame,
    FrameParser,
    Kind,
    ProtocolError,
    decode_json,
    jframe,
    read_one,
)
from offload.sync.scanner import Manifest, hash_file, scan
from offload.sync.status import SyncConflict, SyncedPathStatus, SyncError, SyncState
from offload.sync.watcher import DEBOUNCE_MS, STEP_MS, TreeWatcher

log = logging.getLogger(__name__)

OpenStream = Callable[[], Awaitable[tuple[ByteReader, ByteWriter]]]
Clock = Callable[[], datetime]
MAX_REPORTS = 20


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ---- reconciling two manifests --------------------------------------------------------------


@dataclass
class InitialPlan:
    agreed: Manifest = field(default_factory=dict)  # same on both sides already
    ops: list[Op] = field(default_factory=list)  # to send, in order (deletes deepest first)
    hash_check: dict[str, Entry] = field(default_factory=dict)  # same size, other mtime
    # the runner's, to bring to the laptop, with what the laptop has there now (its expect)
    pull: dict[str, Entry | None] = field(default_factory=dict)
    delete_local: dict[str, Entry] = field(default_factory=dict)  # the runner deleted these


def reconcile(local: Manifest, remote: Manifest, base: Manifest, read_only: bool) -> InitialPlan:
    """Decide, per path, who wins; `base` is what both sides agreed on before (empty at first).

    The laptop's side wins unless only the runner changed a path since `base`; with no base,
    a runner version that differs is overwritten but kept aside (expect=None makes the runner
    treat it as a conflict). A read-only mount makes the runner an exact mirror.
    """
    plan = InitialPlan()
    adds: dict[str, Op] = {}
    deletes: dict[str, Entry] = {}
    for rel in local.keys() | remote.keys():
        mine, theirs, agreed = local.get(rel), remote.get(rel), base.get(rel)
        runner_unchanged = read_only or (
            agreed is not None and theirs is not None and theirs.same(agreed)
        )
        if mine is not None and theirs is not None:
            if mine.same(theirs):
                plan.agreed[rel] = mine
            elif mine.kind == "d" and theirs.kind == "d":
                adds[rel] = Op("meta", rel, mine, theirs)
            elif not read_only and agreed is not None and mine.same(agreed):
                plan.pull[rel] = mine
            elif runner_unchanged:
                adds[rel] = _push(rel, mine, theirs)
            elif mine.kind == theirs.kind == "f" and mine.size == theirs.size:
                plan.hash_check[rel] = theirs
            else:
                adds[rel] = _push(rel, mine, None)
        elif mine is not None:
            if not read_only and agreed is not None and mine.same(agreed):
                plan.delete_local[rel] = mine
            else:
                adds[rel] = _push(rel, mine, None)
        elif theirs is not None:
            if runner_unchanged:
                deletes[rel] = theirs
            else:
                plan.pull[rel] = None
    plan.ops = [Op("delete", p, None, e) for p, e in sorted(deletes.items(), key=_deepest)]
    plan.ops += [adds[p] for p in sorted(adds)]
    return plan


def _push(rel: str, mine: Entry, expect: Entry | None) -> Op:
    kind = {"d": "mkdir", "l": "symlink", "f": "file"}[mine.kind]
    return Op(kind, rel, mine, expect)


def _deepest(item: tuple[str, Entry]) -> tuple[int, str]:
    return (-item[0].count("/"), item[0])


# ---- one synced directory -------------------------------------------------------------------


class _LaptopPeer(SyncPeer):
    def __init__(self, owner: LaptopSync, root: SafeRoot, **kw: Any) -> None:
        super().__init__(root, **kw)
        self._owner = owner
        self.acked = asyncio.Event()

    def _on_conflict(self, rel: str, current: Entry, out: list[Output]) -> bool:
        out.append(Report("recheck", rel))  # keep ours, and make sure the runner gets it
        return False

    def _meta_mismatch(self, rel: str, out: list[Output]) -> None:
        out.append(Report("recheck", rel))

    def on_error(self, rel: str, message: str) -> None:
        log.warning("sync of %s: %s: %s", self._owner.laptop_path, rel or ".", message)
        self._owner._record_error(rel, message)

    def on_conflict(self, rel: str, kept_at: str) -> None:
        super().on_conflict(rel, kept_at)
        self._owner._record_conflict(rel, kept_at)

    def _control(self, kind: Kind, payload: bytes) -> None:
        super()._control(kind, payload)
        if kind == Kind.BARRIER_ACK:
            self._owner._last_synced = self._owner._clock()


class LaptopSync:
    """Keeps `laptop_path` and `<mount area>/<subdir>` on the runner in sync."""

    def __init__(
        self,
        laptop_path: Path,
        subdir: str,
        open_stream: OpenStream,
        *,
        read_only: bool = False,
        only: str | None = None,
        debounce_ms: int = DEBOUNCE_MS,
        step_ms: int = STEP_MS,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 15.0,
        clock: Clock = _utcnow,
    ) -> None:
        self.laptop_path = Path(laptop_path)
        self.subdir = subdir
        self.read_only = read_only
        self.only = only
        self._open_stream = open_stream
        self._debounce_ms = debounce_ms
        self._step_ms = step_ms
        self._reconnect = (reconnect_initial_s, reconnect_max_s)
        self._clock = clock
        self.mount_area: str | None = None
        self.remote_root: str | None = None
        self._base: Manifest = {}
        self._peer: _LaptopPeer | None = None
        self._watcher: TreeWatcher | None = None
        self._state = SyncState.STARTING
        self._errors: list[SyncError] = []
        self._conflicts: list[SyncConflict] = []
        self._last_synced: datetime | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closing = asyncio.Event()
        self._wake = asyncio.Event()  # cuts a reconnect wait short (the tunnel is back)
        self._synced = asyncio.Event()  # connected and reconciled: changes flow both ways

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and run the initial sync; returns when the runner has the whole tree."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = loop.create_task(self._supervise())
        await asyncio.shield(self._ready)

    def kick(self) -> None:
        """Reconnect now if the stream is down (e.g. the tunnel has just come back)."""
        self._wake.set()

    async def ready(self, timeout: float) -> None:
        """Until the stream is connected and reconciled; Unreachable after `timeout`."""
        if not await wait_event(self._synced, timeout):
            raise Unreachable(
                f"the sync of {self.laptop_path} did not reconnect within {timeout:g}s"
            )

    async def close(self) -> None:
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def flush(self) -> None:
        """Return once every laptop change made so far is applied on the runner (including
        those still in the watcher's debounce window)."""
        peer = self._require_peer()
        if self._watcher is not None:
            await self._watcher.caught_up()
        await peer.settle()

    def status(self) -> SyncedPathStatus:
        peer = self._peer
        pending = peer.pending if peer is not None else 0
        state = self._state
        if state == SyncState.SYNCED:
            if pending:
                state = SyncState.PENDING
            elif self._errors:
                state = SyncState.ERROR
        return SyncedPathStatus(
            laptop_path=str(self.laptop_path),
            remote_path=self.remote_root,
            read_only=self.read_only,
            state=state,
            pending_files=pending,
            errors=list(self._errors),
            conflicts=list(self._conflicts),
            last_synced_at=self._last_synced,
            files=len(peer.base) if peer is not None else len(self._base),
        )

    def _require_peer(self) -> _LaptopPeer:
        if self._peer is None or self._peer.closed.is_set():
            raise Unreachable(f"the sync of {self.laptop_path} is not connected")
        return self._peer

    def _record_error(self, rel: str, message: str) -> None:
        self._errors = [*self._errors, SyncError(path=rel, message=message, at=self._clock())][
            -MAX_REPORTS:
        ]

    def _record_conflict(self, rel: str, kept_at: str) -> None:
        item = SyncConflict(path=rel, kept_at=kept_at, at=self._clock())
        self._conflicts = [*self._conflicts, item][-MAX_REPORTS:]

    # ---- the connection -------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay, delay_max = self._reconnect
        while not self._closing.is_set():
            suspended = False
            try:
                await self._session()
                reason = "the sync stream closed"
            except asyncio.CancelledError:
                raise
            except (OffloadError, ProtocolError, OSError, ConnectionError) as exc:
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                suspended = isinstance(exc, Suspended)
            except Exception as exc:  # a bug: say so, and let the supervisor go on
                log.exception("sync of %s failed", self.laptop_path)
                reason = f"internal error ({type(exc).__name__})"
            self._state = SyncState.DISCONNECTED
            self._synced.clear()
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(
                    Unreachable(f"could not sync {self.laptop_path} to the runner: {reason}")
                )
                return
            self._wake.clear()
            if suspended:  # the session is idle: nothing to retry until the tunnel is back
                log.info("sync of %s paused while the session is idle", self.laptop_path)
                await self._wake.wait()
                delay = self._reconnect[0]
                continue
            log.warning("sync of %s interrupted (%s); reconnecting", self.laptop_path, reason)
            if await wait_event(self._wake, delay):
                delay = self._reconnect[0]  # kicked: the tunnel is back, start over
            else:
                delay = min(delay * 2, delay_max)

    async def _session(self) -> None:
        reader, writer = await self._open_stream()
        loop = asyncio.get_running_loop()
        root: SafeRoot | None = None
        watcher: TreeWatcher | None = None
        peer: _LaptopPeer | None = None
        try:
            await loop.run_in_executor(None, _make_dirs, self.laptop_path)
            root = await loop.run_in_executor(None, SafeRoot, self.laptop_path)
            ignore = await loop.run_in_executor(None, IgnoreRules.load, self.laptop_path, self.only)
            parser, pending = FrameParser(), list[Frame]()
            remote = await self._handshake(reader, writer, ignore, parser, pending)
            peer = _LaptopPeer(
                self, root, ignore=ignore, writer=writer, name=f"laptop:{self.subdir}",
                in_place=self.only is not None,
            )  # fmt: skip
            watcher = TreeWatcher(
                root.path, peer.mark_dirty, debounce_ms=self._debounce_ms, step_ms=self._step_ms,
                recursive=self.only is None,  # a file bind: its directory only, not what is below
            )  # fmt: skip
            await peer.call(watcher.start)  # before the scan: no change falls in between
            local = await peer.call(scan, root, ignore)
            plan = reconcile(local, remote, self._base, self.read_only)
            await self._resolve_hashes(peer, plan, local, reader, writer, parser, pending)
            peer.base = dict(plan.agreed)
            for op in plan.ops:
                if op.kind in ("mkdir", "symlink", "meta") and op.entry is not None:
                    peer.base[op.rel] = op.entry
            self._peer = peer
            run = loop.create_task(peer.run(reader, parser, pending))
            watcher.run(loop)
            self._watcher = watcher
            await self._initial(peer, plan, run)
            await run
        finally:
            if peer is not None:
                self._base = dict(peer.base)
            if watcher is not None:
                self._watcher = None
                await loop.run_in_executor(None, watcher.stop)
            if peer is not None:
                await peer.shutdown()
            if root is not None:
                root.close()
            writer.close()

    async def _handshake(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        ignore: IgnoreRules,
        parser: FrameParser,
        pending: list[Frame],
    ) -> Manifest:
        hello = {
            "v": PROTOCOL_VERSION,
            "subdir": self.subdir,
            "read_only": self.read_only,
            "ignore": ignore.lines,
            "only": self.only,
        }
        writer.write(jframe(Kind.HELLO, hello))
        await writer.drain()
        welcome = await self._expect(reader, parser, pending, Kind.WELCOME)
        if self.mount_area is not None and welcome["mount_area"] != self.mount_area:
            # Another environment (a new session, a re-created one): nothing was agreed with
            # it, so nothing missing there may be read as deleted by the runner.
            log.info("sync of %s: the runner's mount area changed", self.laptop_path)
            self._base = {}
        self.mount_area, self.remote_root = welcome["mount_area"], welcome["root"]
        manifest: Manifest = {}
        while True:
            kind, payload = await read_one(reader, parser, pending)
            if kind == Kind.MANIFEST_END:
                if not manifest and self._base:
                    # An empty tree where both sides had files is far more likely a wiped or
                    # new environment than a container deleting everything: push again rather
                    # than delete the laptop's files.
                    log.warning(
                        "sync of %s: the runner's copy is empty; sending everything again",
                        self.laptop_path,
                    )
                    self._base = {}
                return manifest
            if kind != Kind.MANIFEST:
                raise ProtocolError(f"expected the manifest, got {kind.name}")
            for rel, value in decode_json(payload):
                entry = Entry.from_wire(value)
                if entry is not None:
                    manifest[rel] = entry

    async def _expect(
        self, reader: ByteReader, parser: FrameParser, pending: list[Frame], want: Kind
    ) -> Any:
        kind, payload = await read_one(reader, parser, pending)
        if kind == Kind.ERROR:
            raise Unreachable(f"the runner refused the sync: {decode_json(payload).get('message')}")
        if kind != want:
            raise ProtocolError(f"expected {want.name}, got {kind.name}")
        return decode_json(payload)

    async def _resolve_hashes(
        self,
        peer: _LaptopPeer,
        plan: InitialPlan,
        local: Manifest,
        reader: ByteReader,
        writer: ByteWriter,
        parser: FrameParser,
        pending: list[Frame],
    ) -> None:
        """Same size, other mtime: equal content only needs its metadata fixed, not a transfer."""
        if not plan.hash_check:
            return
        paths = sorted(plan.hash_check)
        writer.write(jframe(Kind.HASH_REQ, {"paths": paths}))
        await writer.drain()
        held: list[Frame] = []  # the runner's own changes that arrive meanwhile: kept in order
        while True:
            kind, payload = await read_one(reader, parser, pending)
            if kind == Kind.HASH_REPLY:
                break
            held.append((kind, payload))
        pending[:0] = held
        theirs = decode_json(payload).get("hashes", {})
        mine = await peer.call(lambda: {p: hash_file(peer.root, p) for p in paths})
        extra: list[Op] = []
        for rel in paths:
            if mine[rel] is not None and mine[rel] == theirs.get(rel):
                extra.append(Op("meta", rel, local[rel], plan.hash_check[rel]))
            else:
                extra.append(Op("file", rel, local[rel], None))
        plan.ops = [op for op in plan.ops if op.kind == "delete"] + sorted(
            [op for op in plan.ops if op.kind != "delete"] + extra, key=lambda op: op.rel
        )

    async def _initial(self, peer: _LaptopPeer, plan: InitialPlan, run: asyncio.Task[None]) -> None:
        if plan.delete_local:
            frames = [
                (Kind.DELETE, jframe(Kind.DELETE, {"p": p, "expect": e.to_wire()})[5:])
                for p, e in sorted(plan.delete_local.items(), key=_deepest)
            ]
            peer._handle_outputs(await peer.call(peer._apply_all, frames))
        done = await peer.send_ops(plan.ops)
        if plan.pull:
            wanted = [[p, e.to_wire() if e else None] for p, e in sorted(plan.pull.items())]
            peer.send_reply(jframe(Kind.PULL, {"paths": wanted}))
        assert done is not None
        waiter = asyncio.ensure_future(done)
        finished, _ = await asyncio.wait({waiter, run}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in finished:
            waiter.cancel()
            run.result()  # raises the reason the stream ended
            raise ConnectionError("the sync stream closed during the initial sync")
        waiter.result()
        self._state = SyncState.SYNCED
        self._synced.set()
        self._last_synced = self._clock()
        log.info(
            "initial sync of %s done: %d changes sent, %d files in the tree",
            self.laptop_path, len(plan.ops), len(peer.base),
        )  # fmt: skip
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)


def _make_dirs(path: Path) -> None:
    # Docker creates a missing `-v` bind source; so does the sync (on the laptop, as the user).
    os.makedirs(path, exist_ok=True)


# ---- every synced directory of a session ---------------------------------------------------


class SyncManager:
    """The agent's syncs, one per laptop directory, started on first use and kept running."""

    def __init__(self, open_stream: OpenStream, **sync_options: Any) -> None:
        self._open_stream = open_stream
        self._options = sync_options
        self._syncs: dict[str, LaptopSync] = {}
        self._starting: dict[str, asyncio.Task[LaptopSync]] = {}
        self._mount_area: str | None = None

    async def ensure(
        self, laptop_path: str, subdir: str, *, read_only: bool, only: str | None = None
    ) -> LaptopSync:
        """The running sync of `laptop_path` (started, initial sync done, on first call)."""
        existing = self._syncs.get(subdir)
        if existing is not None and existing.read_only and not read_only:
            # First mounted `:ro`, now writable: the runner must start sending changes back.
            del self._syncs[subdir]
            await existing.close()
        elif existing is not None:
            return existing
        task = self._starting.get(subdir)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._start(laptop_path, subdir, read_only, only)
            )
            self._starting[subdir] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._starting.pop(subdir, None)

    async def _start(
        self, laptop_path: str, subdir: str, read_only: bool, only: str | None
    ) -> LaptopSync:
        sync = LaptopSync(
            Path(laptop_path), subdir, self._open_stream, read_only=read_only, only=only,
            **self._options,
        )  # fmt: skip
        try:
            await sync.start()
        except BaseException:
            await sync.close()
            raise
        self._syncs[subdir] = sync
        return sync

    async def mount_area(self) -> str:
        """The session's mount area on the runner (asked once, then remembered)."""
        if self._mount_area is None:
            reader, writer = await self._open_stream()
            try:
                writer.write(jframe(Kind.HELLO, {"v": PROTOCOL_VERSION, "probe": True}))
                await writer.drain()
                kind, payload = await read_one(reader, FrameParser(), [])
                message = decode_json(payload)
                if kind != Kind.WELCOME or not isinstance(message.get("mount_area"), str):
                    raise Unreachable(
                        f"the runner did not say where its mount area is ({kind.name})"
                    )
                self._mount_area = message["mount_area"]
            finally:
                writer.close()
        return self._mount_area

    def kick(self) -> None:
        """The tunnel has (re)connected: ask the runner for its mount area again (another
        session or environment may answer now) and reconnect every sync at once."""
        self._mount_area = None
        for sync in self._syncs.values():
            sync.kick()

    def statuses(self) -> list[SyncedPathStatus]:
        return [sync.status() for sync in self._syncs.values()]

    async def close(self) -> None:
        for task in self._starting.values():
            task.cancel()
        await asyncio.gather(*self._starting.values(), return_exceptions=True)
        await asyncio.gather(*(s.close() for s in self._syncs.values()), return_exceptions=True)
        self._syncs.clear()
