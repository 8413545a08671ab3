"""The runner side of file sync: one endpoint per session, writing only inside its mount area.

A laptop opens one stream per synced path and says which subdirectory of the mount area it
syncs (`HELLO.subdir`, a plain name). The endpoint answers with the mount area's path (so the
agent can rewrite bind sources) and a manifest of what is already there, then applies the
laptop's changes and, unless the mount is read-only, watches the subdirectory and sends back
what containers write.

Conflicts: the laptop wins. The runner's version is moved aside, outside the synced tree (so
no container sees it and it never syncs back), to
`<mount area>/.offload-conflicts/<subdir>/<UTC time>-<n>-<quoted path>`, and reported.

Every path goes through `offload.sync.paths.SafeRoot`: `..` and absolute paths are refused, and
no symlink is ever followed, whatever a container swaps in between two operations: a symlink
where a directory is expected is an error for that path (logged, reported to the laptop); one
where the laptop writes a file, a link or a directory is replaced (renamed over or kept aside as
a conflict), never written through. Symlinks themselves travel as they are, both ways, with
their target text unchanged (absolute and dangling ones too), as on a local bind mount; reading
a file to send it opens it with `O_NOFOLLOW`, so a link to a host file sends the link, never the
file.

The runner is root on the host; root inside the engine's sandbox is an unprivileged host uid
(`Environment.area_owner`). Everything the endpoint creates in the mount area (the synced
directory, its files, directories and links, the conflicts directory) is given to that owner, so
that containers can change and delete it as on a local bind mount.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from offload.core.waiting import within
from offload.sync.ignore import IgnoreRules
from offload.sync.paths import Owner, PathRefused, SafeRoot
from offload.sync.peer import Output, Report, SyncPeer
from offload.sync.protocol import (
    PROTOCOL_VERSION,
    ByteReader,
    ByteWriter,
    Entry,
    FrameParser,
    Kind,
    ProtocolError,
    decode_json,
    jframe,
    read_one,
)
from offload.sync.scanner import scan
from offload.sync.watcher import SafeTreeWatcher

log = logging.getLogger(__name__)

CONFLICTS_DIR = ".offload-conflicts"
HELLO_TIMEOUT_S = 30.0
MANIFEST_BATCH = 2000
# What a laptop may name: the stable id `offload.agent.binds` makes, never a dot name (those
# are the endpoint's own, like the conflicts directory).
_SUBDIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


class _RunnerPeer(SyncPeer):
    def __init__(self, root: SafeRoot, area: SafeRoot, subdir: str, **kw: Any) -> None:
        super().__init__(root, **kw)
        self._area = area
        self._subdir = subdir
        self._kept = 0

    def _on_conflict(self, rel: str, current: Entry, out: list[Output]) -> bool:
        kept_at = self._keep_aside(rel)
        log.warning(
            "sync %s: conflict on %s: the runner's version kept at %s", self.name, rel, kept_at
        )
        out.append(Report("conflict", rel, kept_at))
        return True

    def _keep_aside(self, rel: str) -> str:
        self._kept += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{stamp}-{self._kept}-{quote(rel, safe='')[:180]}"
        with SafeRoot.open_child(self._area, CONFLICTS_DIR) as conflicts:
            with SafeRoot.open_child(conflicts, self._subdir) as mine:
                self.root.move_out(rel, mine, name)
                return str(mine.path / name)

    def on_error(self, rel: str, message: str) -> None:
        self.send_reply(jframe(Kind.ERROR, {"p": rel, "message": message}))

    def on_conflict(self, rel: str, kept_at: str) -> None:
        self.send_reply(jframe(Kind.CONFLICT, {"p": rel, "kept_at": kept_at}))


class RemoteEndpoint:
    """Serves sync streams for one mount area (one session's environment)."""

    def __init__(
        self, mount_area: Path, *, batch_ms: int = 5, area_owner: Owner | None = None
    ) -> None:
        self.mount_area = Path(mount_area)
        self.batch_ms = batch_ms
        self.area_owner = area_owner  # uid/gid of what the sync creates; None: the runner's own
        self.active: set[str] = set()  # subdirs being served now

    async def serve(self, reader: ByteReader, writer: ByteWriter) -> None:
        """Serve one stream until the laptop closes it; never raises for a misbehaving peer."""
        try:
            await self._serve(reader, writer)
        except (ProtocolError, PathRefused) as exc:
            log.warning("sync stream for %s refused: %s", self.mount_area, exc)
            _send_error(writer, "", str(exc))
        except (ConnectionError, OSError) as exc:
            log.info("sync stream for %s ended: %s", self.mount_area, exc)
        except Exception:  # a bug must not take the runner's SSH endpoint down with it
            log.exception("sync stream for %s failed", self.mount_area)
        finally:
            writer.close()

    async def _serve(self, reader: ByteReader, writer: ByteWriter) -> None:
        parser = FrameParser()
        pending: list[Any] = []
        kind, payload = await within(read_one(reader, parser, pending), HELLO_TIMEOUT_S)
        if kind != Kind.HELLO:
            raise ProtocolError(f"expected HELLO, got {kind.name}")
        hello = decode_json(payload)
        if isinstance(hello, dict) and hello.get("probe"):
            # The agent asks where the mount area is (to rewrite bind sources): nothing else.
            writer.write(jframe(Kind.WELCOME, {"mount_area": str(self.mount_area), "root": None}))
            await writer.drain()
            return
        subdir, read_only, ignore = _parse_hello(hello)
        loop = asyncio.get_running_loop()
        area = await loop.run_in_executor(
            None, functools.partial(SafeRoot, self.mount_area, owner=self.area_owner)
        )
        root: SafeRoot | None = None
        watcher: SafeTreeWatcher | None = None
        peer: _RunnerPeer | None = None
        try:
            root = await loop.run_in_executor(None, SafeRoot.open_child, area, subdir)
            peer = _RunnerPeer(
                root, area, subdir, ignore=ignore, writer=writer, name=f"runner:{subdir}",
                in_place=ignore.only is not None,
            )  # fmt: skip
            if not read_only:
                watcher = SafeTreeWatcher(root, ignore, peer.mark_dirty, batch_ms=self.batch_ms)
                await peer.call(watcher.start)  # before the scan: nothing written is missed
            manifest = await peer.call(scan, root, ignore)
            peer.base = dict(manifest)
            writer.write(
                jframe(Kind.WELCOME, {"mount_area": str(self.mount_area), "root": str(root.path)})
            )
            items = [[p, e.to_wire()] for p, e in manifest.items()]
            for i in range(0, len(items), MANIFEST_BATCH):
                writer.write(jframe(Kind.MANIFEST, items[i : i + MANIFEST_BATCH]))
            writer.write(jframe(Kind.MANIFEST_END, {}))
            await writer.drain()
            if watcher is not None:
                watcher.run(loop)
            self.active.add(subdir)
            log.info("sync of %s started (%s)", root.path, "read-only" if read_only else "two-way")
            await peer.run(reader, parser, pending, send=not read_only)
        finally:
            self.active.discard(subdir)
            if watcher is not None:
                await loop.run_in_executor(None, watcher.stop)
            if peer is not None:
                await peer.shutdown()
            if root is not None:
                root.close()
            area.close()


def _parse_hello(hello: Any) -> tuple[str, bool, IgnoreRules]:
    if not isinstance(hello, dict) or hello.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported sync protocol (want version {PROTOCOL_VERSION})")
    subdir = hello.get("subdir")
    if not isinstance(subdir, str) or not _SUBDIR.match(subdir):
        raise PathRefused(f"refused sync directory {subdir!r}: not a plain name")
    lines = hello.get("ignore") or []
    only = hello.get("only")
    if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
        raise ProtocolError("ignore rules must be a list of strings")
    if only is not None and (not isinstance(only, str) or "/" in only or only in ("", ".", "..")):
        raise PathRefused(f"refused single-file sync {only!r}: not a plain name")
    return subdir, bool(hello.get("read_only")), IgnoreRules(lines, only)


def _send_error(writer: ByteWriter, rel: str, message: str) -> None:
    try:
        writer.write(jframe(Kind.ERROR, {"p": rel, "message": message}))
    except Exception:  # the stream is already gone
        pass
