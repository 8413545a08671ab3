"""Bind sources in the engine's answers, shown as the laptop paths the client asked for.

A create's laptop bind sources are rewritten to runner paths in the session's mount area
(`offload.agent.binds`), so the engine reports those: in `GET /containers/{id}/json`
(`Mounts[].Source`, `HostConfig.Binds[]`, `HostConfig.Mounts[].Source`) and in
`GET /containers/json` (`Mounts[].Source`). A local engine would report the laptop paths, and
clients compare them (SDK test suites, compose). `BindSources.restore` puts them back.

The laptop path is not derivable from the runner path: the mount-area directory is a hash of it
(`binds.stable_id`). So `BindSources` remembers, for each path it rewrote, the path relative to
the mount area (`<id>`, `<id>/<name>` for a file, the engine socket's name) and the laptop
source, together with the mount area itself, in a small file next to the agent's state
(`run/bind-sources.json`), written when something new is learned. An agent started again
therefore still answers for the containers its predecessor created. A stable id always stands
for the same laptop path, so entries never go stale; the oldest are dropped past
`MAX_SOURCES`.

The engine's socket (`binds.DOCKER_SOCKETS`, one runner path for both spellings) shows as the
spelling the latest create used.

Only a source under the mount area that names a remembered entry exactly maps back; everything
else, and any answer that is not the JSON expected, is returned byte for byte as it came.
Container events name no bind sources (the engine's `mount` events are for volumes), so they
need nothing.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from offload.agent.binds import RemoteSource
from offload.agent.state import write_model

log = logging.getLogger(__name__)

MAX_SOURCES = 4096
SOURCES_FILE = "bind-sources.json"


class ResponseKind(Enum):
    """An engine answer that names bind sources."""

    INSPECT = "inspect"  # GET /containers/{id}/json: one container
    LIST = "list"  # GET /containers/json: a list of containers


class _Stored(BaseModel):
    mount_area: str | None = None
    sources: dict[str, str] = {}  # path relative to the mount area -> laptop source


class BindSources:
    """The laptop sources of the runner paths the agent put into create bodies."""

    def __init__(self, path: Path | None = None) -> None:
        """`path`: where to keep them across agent restarts (None: in memory only)."""
        self.path = path
        self._stored = _load(path)

    @property
    def mount_area(self) -> str | None:
        return self._stored.mount_area

    def learn(self, mount_area: str, sources: Iterable[RemoteSource]) -> None:
        """Remember what a create's rewrite did (`mount_area`: the one it rewrote into)."""
        stored = self._stored
        area = posixpath.normpath(mount_area)
        changed = stored.mount_area != area
        stored.mount_area = area
        for source in sources:
            relative = _relative(source.remote, area)
            if relative is None or stored.sources.get(relative) == source.laptop:
                continue
            stored.sources.pop(relative, None)  # re-inserted last: the newest
            stored.sources[relative] = source.laptop
            changed = True
        if not changed:
            return
        for old in list(stored.sources)[: max(0, len(stored.sources) - MAX_SOURCES)]:
            del stored.sources[old]
        if self.path is not None:
            try:
                write_model(self.path, stored)
            except OSError as exc:  # the answers of this agent are still right
                log.warning("could not write %s: %s", self.path, exc)

    def laptop_source(self, remote: str) -> str | None:
        """The laptop path a runner path stands for; None: not one the agent made."""
        area = self._stored.mount_area
        if area is None or not remote.startswith(area + "/"):
            return None
        return self._stored.sources.get(remote[len(area) + 1 :])

    def restore(self, kind: ResponseKind, body: bytes) -> bytes:
        """`body` with the bind sources the agent made shown as the laptop's; `body` itself
        (the same object) when nothing in it maps back or it is not the JSON expected."""
        if not self._stored.sources:
            return body
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        if kind is ResponseKind.INSPECT:
            changed = isinstance(doc, dict) and self._container(doc, inspect=True)
        else:
            changed = isinstance(doc, list) and any(
                [self._container(c, inspect=False) for c in doc if isinstance(c, dict)]
            )
        if not changed:
            return body
        return _encode_like_go(doc, newline=body.endswith(b"\n"))

    # ---- the fields that name sources ---------------------------------------------------------

    def _container(self, doc: dict[str, Any], *, inspect: bool) -> bool:
        changed = self._mounts(doc.get("Mounts"))
        host_config = doc.get("HostConfig") if inspect else None
        if isinstance(host_config, dict):
            changed = self._mounts(host_config.get("Mounts")) or changed
            changed = self._binds(host_config) or changed
        return changed

    def _mounts(self, mounts: Any) -> bool:
        changed = False
        for mount in mounts if isinstance(mounts, list) else ():
            if not isinstance(mount, dict) or not isinstance(mount.get("Source"), str):
                continue
            laptop = self.laptop_source(mount["Source"])
            if laptop is not None:
                mount["Source"] = laptop
                changed = True
        return changed

    def _binds(self, host_config: dict[str, Any]) -> bool:
        binds = host_config.get("Binds")
        if not isinstance(binds, list):
            return False
        changed = False
        for i, bind in enumerate(binds):
            if not isinstance(bind, str):
                continue
            source, sep, rest = bind.partition(":")
            laptop = self.laptop_source(source)
            if laptop is not None:
                binds[i] = laptop + sep + rest
                changed = True
        return changed


def _relative(remote: str, area: str) -> str | None:
    if not remote.startswith(area + "/"):
        return None
    return remote[len(area) + 1 :]


def _load(path: Path | None) -> _Stored:
    if path is None:
        return _Stored()
    try:
        return _Stored.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return _Stored()
    except (OSError, ValidationError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return _Stored()


# Go's encoder (the engine's) escapes these; they only ever occur inside JSON strings.
_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}  # fmt: skip


def _encode_like_go(doc: Any, *, newline: bool) -> bytes:
    """Compact JSON in the engine's key order and escaping (`json.NewEncoder`'s newline too)."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    for char, escaped in _GO_ESCAPES.items():
        if char in text:
            text = text.replace(char, escaped)
    return (text + ("\n" if newline else "")).encode()
